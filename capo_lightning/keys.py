"""Every logged metric's key, in one place: what the step, the DataModule, the rewards and the
callbacks write, and what the callbacks, the collapse detector, ``capo report`` and the study
scripts read.

A leaf: it imports nothing of the package, so ``capo report`` (which reads only files) may use it.
Library code names a metric only through this module (``tests/unit/test_metric_keys.py`` refuses a
key spelled out anywhere else and checks that every key a reader names is written by a real run).
Keys are namespaced: ``train/*`` the batch's rewards, ``rollout/*`` the sampling side,
``objective/*`` the loss side, ``select/*`` and ``curvature/*`` the selector, ``collapse/*`` the
detector, ``time/*`` timings, ``verifier/*`` the grader, ``val/*`` and ``test/*`` evaluation. README
"Metrics" describes each.
"""

from __future__ import annotations

# ---- train/: the batch's rewards and the run's progress ------------------------------------------
REWARD_MEAN = "train/reward_mean"
REWARD_STD = "train/reward_std"
ACCURACY = "train/accuracy"  # share of completions with reward > 0.5: the paper's training accuracy
# cumulative completions over all ranks: every figure's x axis
COMPLETIONS = "train/completions_total"
LR = "train/lr"

# ---- rollout/: the sampling side -----------------------------------------------------------------
RESPONSE_LENGTH_MEAN = "rollout/response_length_mean"
RESPONSE_LENGTH_MAX = "rollout/response_length_max"
TRUNCATED_FRAC = "rollout/truncated_frac"
ZERO_STD_GROUPS = "rollout/frac_zero_std_groups"
STALENESS = "rollout/staleness"
ENGINE_GAP = "rollout/engine_trainer_logprob_gap"
TOKENS_PER_S = "rollout/tokens_per_s"
SAMPLING_ROUNDS = "rollout/sampling_rounds"
GROUPS_GENERATED = "rollout/groups_generated"
GROUPS_KEPT_FRAC = "rollout/groups_kept_frac"
GROUPS_FILLED = "rollout/groups_filled"
SYNC_PROBE_GAP = "rollout/sync_probe_gap"
UNGRADED_GROUPS = "rollout/ungraded_groups"  # groups with a reward the grader failed to give

# ---- objective/: the loss side -------------------------------------------------------------------
LOSS = "objective/loss"
NORMALIZER = "objective/normalizer"
ENTROPY = "objective/entropy"
GRAD_NORM = "objective/grad_norm"
KL = "objective/kl"
RATIO_MEAN = "objective/ratio_mean"
CLIP_FRAC_LOW = "objective/clip_frac_low"
CLIP_FRAC_HIGH = "objective/clip_frac_high"
SKIPPED_STEPS = "objective/skipped_steps"

# ---- select/: the selector's decision, counted over all ranks ------------------------------------
TOKEN_REJECT_RATE = "select/token_reject_rate"
REJECT_RATE_POS_ADV = "select/reject_rate_pos_adv"
REJECT_RATE_NEG_ADV = "select/reject_rate_neg_adv"
REJECTED_POS_ADV_SHARE = "select/rejected_pos_adv_share"
TOKENS_JUDGED = "select/tokens_judged"
TOKENS_REJECTED = "select/tokens_rejected"
CALIBRATING = "select/calibrating"


def reject_rate(test: str, cumulative: bool = False) -> str:
    """``select/reject_rate_<test>[_cum]``: the share of judged tokens that failed one declared
    test."""
    return f"select/reject_rate_{test}" + ("_cum" if cumulative else "")


def cumulative(key: str) -> str:
    """``select/token_reject_rate`` -> ``select/token_reject_rate_cum``: the same rate over the run
    so far."""
    return f"{key}_cum"


def threshold(name: str) -> str:
    """``select/<name>``: a selector's threshold in force (CAPO: ``delta_f``, ``tau_h``)."""
    return f"select/{name}"


# ---- curvature/: the shifts a selector reports ---------------------------------------------------
SHIFT_STATS = ("mean", "max", "p50", "p95")


def shift(name: str, stat: str | None = None, masked: bool = False) -> str:
    """``curvature/[masked_]<name>[_<stat>]``: a per-token shift's statistic over the judged (or
    kept) tokens, or a step-level shift (no ``stat``)."""
    return f"curvature/{'masked_' if masked else ''}{name}" + (f"_{stat}" if stat else "")


TOKEN_FISHER_MEAN = shift("token_fisher", "mean")  # CAPO's shifts, which the report draws (Fig. 3)
TOKEN_HESSIAN_MEAN = shift("token_hessian", "mean")
TOKEN_FISHER_P95 = shift("token_fisher", "p95")
TOKEN_HESSIAN_P95 = shift("token_hessian", "p95")
GLOBAL_FISHER = shift("global_fisher")
GLOBAL_HESSIAN = shift("global_hessian")


def masked(key: str) -> str:
    """``curvature/token_fisher_mean`` -> ``curvature/masked_token_fisher_mean`` (the shift after
    the mask)."""
    return key.replace("curvature/", "curvature/masked_", 1)


# ---- collapse/: the detector ---------------------------------------------------------------------
COLLAPSE_ALARM = "collapse/alarm"


def collapse(signal: str) -> str:
    """``collapse/<signal>``: 1 when the signal is over its threshold this step."""
    return f"collapse/{signal}"


# ---- time/ ---------------------------------------------------------------------------------------
TIME = "time/"
TIME_STEP = "time/step_s"
TIME_TRAIN = "time/train_s"
TIME_VAL = "time/val_s"
TIME_GENERATE = "time/generate_s"
TIME_REWARD = "time/reward_s"

# ---- verifier/: the grader's health (per batch, from the reward function) ------------------------
VERIFIER = "verifier/"
VERIFIER_PARSE_FAIL_PRED = "verifier/parse_fail_pred"
VERIFIER_PARSE_FAIL_GOLD = "verifier/parse_fail_gold"
VERIFIER_TIMEOUTS = "verifier/timeouts"
VERIFIER_ERRORS = "verifier/errors"
VERIFIER_LATENCY_P95 = "verifier/latency_ms_p95"
VERIFIER_LATENCY_MAX = "verifier/latency_ms_max"


def measured(key: str) -> bool:
    """Whether ``key`` measures the machine (``time/*``, rollout throughput, grader latency, also
    per evaluation dataset): two runs of one seed never log it equal, while every other key is a
    function of the seed and the code (what resume, fault and behaviour comparisons check)."""
    return key.startswith(TIME) or key == TOKENS_PER_S or "latency_ms" in key


# ---- eval/: a batch's own bookkeeping (not logged) -----------------------------------------------
VALID_PROMPTS = "eval/valid_prompts"  # the problems of an eval batch that are not padding repeats


# ---- val/, test/: evaluation ---------------------------------------------------------------------
def evaluation(stage: str, metric: str, dataset: str | None = None) -> str:
    """``<stage>[/<dataset>]/<metric>``: ``val/accuracy`` (the mean over the eval sets),
    ``val/gsm8k/pass@4``."""
    return f"{stage}/{dataset}/{metric}" if dataset else f"{stage}/{metric}"


VAL_ACCURACY = evaluation("val", "accuracy")
