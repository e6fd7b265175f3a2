"""Evaluator: per-dataset accuracy, unbiased pass@k and maj@n from graded eval batches; prompt templates."""

from __future__ import annotations

from itertools import combinations
from statistics import mean

import pytest
import torch

from capo_lightning.batch import RolloutBatch, RolloutTexts
from capo_lightning.data.templates import TEMPLATES, get_template
from capo_lightning.evaluation import Evaluator


def eval_batch(completions: list[list[str]], correct: list[list[int]], valid: int | None = None) -> RolloutBatch:
    """A RolloutBatch of P problems x n completions with the given texts and 0/1 grades."""
    p, n = len(completions), len(completions[0])
    flat = [c for row in completions for c in row]
    batch = RolloutBatch(
        input_ids=torch.ones(p * n, 4, dtype=torch.long),
        attention_mask=torch.ones(p * n, 4, dtype=torch.bool),
        response_mask=torch.tensor([[True, True, False]] * (p * n)),
        behavior_logprobs=torch.zeros(p * n, 3),
        rewards=torch.tensor([float(c) for row in correct for c in row]),
        group_ids=torch.arange(p).repeat_interleave(n),
        truncated=torch.zeros(p * n, dtype=torch.bool),
        policy_version=0,
        texts=RolloutTexts(prompts=["q"] * (p * n), completions=flat, answers=["a"] * (p * n)),
    )
    if valid is not None:
        batch.stats["eval/valid_prompts"] = float(valid)
    return batch


def brute_pass_at_k(row: list[int], k: int) -> float:
    subsets = list(combinations(row, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_evaluator_matches_brute_force_per_dataset() -> None:
    ev = Evaluator("val", ["easy", "hard"], n=4, device=torch.device("cpu"))
    easy = [[1, 1, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    easy_text = [
        ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "\\boxed{4}"],  # majority 4, correct
        ["\\boxed{2}", "\\boxed{2}", "\\boxed{3}", "\\boxed{7}"],  # majority 2, wrong although one is right
        ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{x}"],  # 1/2 forms share a key
    ]
    ev.update(eval_batch(easy_text[:2], easy[:2]), dataloader_idx=0)
    ev.update(eval_batch(easy_text[2:], easy[2:]), dataloader_idx=0)
    hard = [[0, 0, 0, 0], [0, 1, 0, 0]]
    hard_text = [["no"] * 4, ["\\boxed{8}", "\\boxed{9}", "\\boxed{8}", "\\boxed{7}"], ["pad"] * 4]
    ev.update(eval_batch(hard_text, hard + [[1, 1, 1, 1]], valid=2), dataloader_idx=1)  # the 3rd problem pads
    out = ev.compute()
    for name, rows, maj in (("easy", easy, [1, 0, 1]), ("hard", hard, [0, 0])):
        assert out[f"val/{name}/accuracy"].item() == pytest.approx(mean(sum(r) / 4 for r in rows))
        for k in (1, 2, 4):
            assert out[f"val/{name}/pass@{k}"].item() == pytest.approx(mean(brute_pass_at_k(r, k) for r in rows))
        assert out[f"val/{name}/maj@4"].item() == pytest.approx(mean(maj))
    # the padding problem (all correct) was left out of "hard"
    assert out["val/hard/accuracy"].item() == pytest.approx(1 / 8)
    assert out["val/accuracy"].item() == pytest.approx((out["val/easy/accuracy"] + out["val/hard/accuracy"]).item() / 2)


def test_batch_metrics_carry_verifier_stats_under_the_dataset() -> None:
    ev = Evaluator("test", ["champ"], n=2, device=torch.device("cpu"))
    batch = eval_batch([["a", "b"]], [[0, 1]])
    batch.stats["verifier/timeouts"] = 3.0
    metrics = ev.batch_metrics(batch)
    assert metrics["test/champ/timeouts"].item() == 3.0
    assert metrics["test/champ/response_length_mean"].item() == 2.0
    assert metrics["test/champ/truncated_frac"].item() == 0.0


class _ChatTokenizer:
    """A tokenizer stand-in with a ChatML-style template; the real tokenizers are tested in integration."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        body = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")


def test_templates_format_questions() -> None:
    tok = _ChatTokenizer()
    question = "What is 2+2?"
    assert get_template("chat").format(question, tok) == f"<|user|>{question}\n<|assistant|>"
    paper = get_template("paper").format(question, tok)
    assert paper.startswith("<|system|>") and "<think>" in paper and "\\boxed{}" in paper and question in paper
    assert "Please reason step by step" in get_template("qwen_math").format(question, tok)
    evaluation = get_template("eval").format(question, tok)
    assert evaluation.startswith("<|user|>Solve the following math problem") and evaluation.count(question) == 1
    assert get_template("plain").format(question, tok) == question
    assert get_template("chat").format(question, tok, system="Be brief.").startswith("<|system|>Be brief.")
    assert get_template("qwen_math").format(question, object()).endswith(f"\\boxed{{}}.\n\n{question}")  # no template
    assert set(TEMPLATES) == {"chat", "paper", "eval", "qwen_math", "plain"}
    with pytest.raises(ValueError, match="data.template='r2'.*choose one of"):
        get_template("r2")


def test_summary_table_lists_every_set() -> None:
    ev = Evaluator("val", ["arithmetic", "champ"], n=2, device=torch.device("cpu"))
    ev.update(eval_batch([["\\boxed{1}", "\\boxed{2}"]], [[1, 0]]), 0)
    ev.update(eval_batch([["x", "y"]], [[0, 0]]), 1)
    table = ev.summary(ev.compute(), step=6).splitlines()
    assert table[0] == "val at step 6: 2 samples per problem"
    assert table[1].split() == ["set", "accuracy", "pass@1", "pass@2", "maj@2"]
    assert table[2].split() == ["arithmetic", "0.5000", "0.5000", "1.0000", "1.0000"]
    assert table[3].split() == ["champ", "0.0000", "0.0000", "0.0000", "0.0000"]
    assert table[4].split() == ["mean", "accuracy", "0.2500"]


def test_a_set_without_batches_still_computes() -> None:
    # under DDP a rank may hold no problem of a small set; its metrics must still compute (and sync)
    ev = Evaluator("val", ["big", "tiny"], n=2, device=torch.device("cpu"))
    ev.update(eval_batch([["\\boxed{1}", "\\boxed{2}"]], [[1, 0]]), 0)
    out = ev.compute()
    assert out["val/big/pass@2"].item() == 1.0
    assert torch.isnan(out["val/tiny/accuracy"])  # no problems: NaN (0/0), summed away by the rank sync
