"""The ``capo`` command, run in-process through ``cli.main`` (and once as a real console script)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capo_lightning.commands.cli import main
from tests.conftest import ROOT
from tests.helpers import read_records

TINY = str(ROOT / "conf/debug/tiny_cpu.yaml")


def tiny_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", TINY, f"--trainer.default_root_dir={root}", *extra]


def read_metrics(root: Path) -> list[dict[str, str]]:
    files = sorted(root.glob("logs/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def test_fit_runs_two_steps_and_logs_csv(tmp_path: Path) -> None:
    main(tiny_args(tmp_path))
    rows = [r for r in read_metrics(tmp_path) if r.get("train/reward_mean")]
    assert len(rows) == 2
    assert [float(r["train/completions_total"]) for r in rows] == [8.0, 16.0]  # 2 prompts x 4 samples per step
    assert all(float(r["time/train_s"]) > 0 for r in rows)
    assert rows[1]["time/step_s"] and float(rows[1]["time/step_s"]) > 0
    assert (tmp_path / "checkpoints/last.ckpt").exists()
    config = next(tmp_path.glob("logs/version_*/config.yaml")).read_text()
    assert "capo_lightning.objectives.GRPO" in config


def test_a_fit_leaves_no_stamp_behind_for_the_next_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """{stamp} is filled for the run (its processes inherit it), then taken back: the next command in the
    same process stamps its own run."""
    from capo_lightning.scale.launch import STAMP_VARIABLE

    monkeypatch.delenv(STAMP_VARIABLE, raising=False)
    main(tiny_args(tmp_path / "{run}-{stamp}", "--trainer.max_steps=1"))
    [folder] = list(tmp_path.iterdir())
    assert "{stamp}" not in folder.name and (folder / "checkpoints/last.ckpt").exists()
    assert STAMP_VARIABLE not in os.environ


def test_resume_from_last_continues_at_the_same_step_and_data(tmp_path: Path) -> None:
    recorder = "tests.helpers.BatchRecorder"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(
        tiny_args(
            straight,
            "--trainer.max_steps=3",
            f"--trainer.callbacks+={recorder}",
            f"--trainer.callbacks.path={straight / 'b.jsonl'}",
        )
    )
    main(tiny_args(resumed, "--trainer.max_steps=2"))
    main(
        tiny_args(
            resumed,
            "--trainer.max_steps=3",
            "--ckpt_path=last",
            f"--trainer.callbacks+={recorder}",
            f"--trainer.callbacks.path={resumed / 'b.jsonl'}",
        )
    )
    full, cont = read_records(straight / "b.jsonl"), read_records(resumed / "b.jsonl")
    assert len(full) == 3 and len(cont) == 1
    assert cont[0]["global_step"] == 2 and cont[0]["rollout_step"] == 2
    assert cont[0]["prompts"] == full[2]["prompts"]
    assert cont[0]["completions"] == full[2]["completions"]  # same weights, same sampling seed
    a = torch.load(straight / "checkpoints/last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3
    for key, value in a["state_dict"].items():  # equal only if optimizer moments were restored too
        assert torch.allclose(value, b["state_dict"][key], atol=1e-6), key


def test_config_typo_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(tmp_path, "--model.objetive=GRPO"))
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "objetive" in err
    assert "Did you mean: --model.objective" in err
    assert not (tmp_path / "checkpoints").exists()


def test_yaml_typo_is_named_with_a_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  ppo_epoch: 2\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--config", str(typo)])
    err = capsys.readouterr().err
    assert "model.ppo_epoch" in err and "--model.ppo_epochs" in err


def test_missing_model_path_fails_with_the_field_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.policy.name_or_path"):
        main(tiny_args(tmp_path, "--model.policy.name_or_path=/nonexistent/model"))


def test_prompt_longer_than_budget_fails_with_the_field_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.max_prompt_tokens"):
        main(tiny_args(tmp_path, "--data.max_prompt_tokens=5"))


def test_a_finite_source_with_one_prompt_over_budget_fails_before_training_naming_it(tmp_path: Path) -> None:
    """Bad data in a file: found when the run starts (every prompt formatted and counted), not at the step that
    would first draw it, which for item 7 of 9 might be hours in."""
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(9)]
    rows[7]["prompt"] = "what is " + "one plus " * 60 + "one?"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = ["--data.train_source=capo_lightning.data.prompts.JsonlSource", f"--data.train_source.path={data}"]
    with pytest.raises(ValueError, match=r"data.train_source \(jsonl:train\): 1 of 9 prompts .* item 7 \("):
        main(tiny_args(tmp_path, *source))
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.glob("logs/version_*/metrics.csv"))


def test_print_config_shows_documented_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    for key in ("ppo_epochs: 1", "group_size: 4", "class_path: capo_lightning.objectives.GRPO", "max_new_tokens: 16"):
        assert key in out


@pytest.mark.skipif(
    shutil.which("capo") is None and not (Path(sys.executable).parent / "capo").exists(),
    reason="console script not installed",
)
def test_console_script_help_lists_subcommands_and_documents_arguments() -> None:
    exe = shutil.which("capo") or str(Path(sys.executable).parent / "capo")
    top = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0
    for sub in ("fit", "validate", "test"):
        assert sub in top.stdout
    fit = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert fit.returncode == 0
    assert "--model.ppo_epochs" in fit.stdout
    assert "passes over each rollout batch" in fit.stdout  # the docstring is the help text
    assert "--data.group_size" in fit.stdout


def test_jsonl_prompts_train_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "math.jsonl"
    data.write_text(
        '{"prompt": "What is 2 + 3?", "answer": "5", "level": 1}\n{"prompt": "What is 7 - 4?", "answer": 3}\n'
    )
    main(
        tiny_args(
            tmp_path,
            "--trainer.max_steps=1",
            "--data.train_source=capo_lightning.data.prompts.JsonlSource",
            f"--data.train_source.path={data}",
        )
    )
    rows = [r for r in read_metrics(tmp_path) if r.get("train/reward_mean")]
    assert len(rows) == 1


def test_jsonl_row_without_answer_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n{"prompt": "What is 7 - 4?"}\n')
    with pytest.raises(Exception, match=r"line 2") as exc:
        main(
            tiny_args(
                tmp_path,
                "--data.train_source=capo_lightning.data.prompts.JsonlSource",
                f"--data.train_source.path={data}",
            )
        )
    assert "broken.jsonl" in str(exc.value) and "answer" in str(exc.value)


def test_empty_prompt_file_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(Exception, match="empty.jsonl"):
        main(
            tiny_args(
                tmp_path,
                "--data.train_source=capo_lightning.data.prompts.JsonlSource",
                f"--data.train_source.path={data}",
            )
        )


def test_prompt_plus_response_longer_than_the_context_is_rejected(tmp_path: Path) -> None:
    # the tiny model has a 512-token context
    with pytest.raises(ValueError, match="exceeds the model's context"):
        main(tiny_args(tmp_path, "--data.max_prompt_tokens=600"))


def test_validate_and_test_from_a_checkpoint(tmp_path: Path) -> None:
    main(tiny_args(tmp_path, "--trainer.max_steps=1"))
    ckpt = tmp_path / "checkpoints/last.ckpt"
    held_out = tmp_path / "held_out.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sources = (
        '[{"class_path": "capo_lightning.data.prompts.ArithmeticSource", "init_args": {"seed": 7, "max_value": 9}}, '
        f'{{"class_path": "capo_lightning.data.prompts.JsonlSource", "init_args": {{"path": "{held_out}"}}}}]'
    )
    for sub, stage in (("validate", "val"), ("test", "test")):
        main([sub, "--config", TINY, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt}",
              f"--data.val_source={sources}", "--data.val_samples=4", "--data.val_batch_size=3"])  # fmt: skip
        row = {k: float(v) for k, v in read_metrics(tmp_path)[-1].items() if v}
        means = []
        for name in ("arithmetic", "jsonl:held_out"):
            key = f"{stage}/{name}"
            pass_k = [row[f"{key}/pass@{k}"] for k in (1, 2, 4)]
            assert row[f"{key}/accuracy"] == pytest.approx(pass_k[0], abs=1e-6), sub  # pass@1 is mean@n
            assert pass_k == sorted(pass_k) and 0.0 <= pass_k[-1] <= 1.0, sub
            assert 0.0 <= row[f"{key}/maj@4"] <= 1.0 and f"{key}/response_length_mean" in row
            means.append(row[f"{key}/accuracy"])
        assert row[f"{stage}/accuracy"] == pytest.approx(sum(means) / 2, abs=1e-6)


@pytest.mark.parametrize("objective", ["grpo", "dr_grpo", "dapo", "reinforce"])
def test_capo_selection_composes_with_every_objective(tmp_path: Path, objective: str) -> None:
    # CAPO only changes the mask: CAPO, Dr.CAPO, DAPO + CAPO and ReinCAPO all run from config fragments
    main(
        tiny_args(
            tmp_path,
            "--trainer.max_steps=1",
            "--config",
            str(ROOT / f"conf/objective/{objective}.yaml"),
            "--config",
            str(ROOT / "conf/selector/capo.yaml"),
            "--data.reward_fn=tests.helpers.length_reward",
        )
    )
    row = next(r for r in read_metrics(tmp_path) if r.get("select/token_reject_rate"))
    assert 0.0 <= float(row["select/token_reject_rate"]) <= 1.0
    assert float(row["curvature/token_fisher_max"]) > 0.0  # length rewards vary: non-zero advantages and shifts


def test_help_lists_what_runs_and_predict_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``capo --help`` names fit/validate/test plus report and export; ``predict`` (no predict step) is not offered."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{fit,validate,test}" in out and "capo report" in out and "capo export" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", "conf/quickstart.yaml"])
    assert exit_info.value.code != 0
    assert "invalid choice: 'predict'" in capsys.readouterr().err
