"""The GPU scripts, checked without a GPU: both parse (`bash -n`), and scripts/gpu_check.sh's per-part time
budgets are the ones its header states and sum, with the kill grace, to under the 8 minutes a lent GPU machine
allows. (shellcheck is not installed here; the scripts' CPU rehearsal is CAPO_GPU_DRY_RUN=1, see their headers.)"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = ("scripts/gpu_check.sh", "scripts/gpu_multi_check.sh")
PARTS = ROOT / "scripts/gpu_parts.sh"  # run_part and GRACE, sourced by both


def _budgets(text: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(header's budgets, run_part's budgets, GRACE) of a script."""
    header = text.split("\nset -euo pipefail", 1)[0]
    declared = {m[1]: int(m[2]) for m in re.finditer(r"^#   (\S+)\s+(\d+)  ", header, flags=re.M)}
    used = {m[1]: int(m[2]) for m in re.finditer(r"^\s*run_part (\S+) (\d+) ", text, flags=re.M)}
    grace = int(re.search(r"^GRACE=(\d+)", PARTS.read_text(), flags=re.M)[1])  # gpu_parts.sh, sourced
    return declared, used, grace


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_script_parses_and_is_strict(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    subprocess.run(["bash", "-n", str(PARTS)], check=True)
    text = (ROOT / script).read_text()
    assert '. "$(dirname "${BASH_SOURCE[0]}")/gpu_parts.sh"' in text
    assert "\nset -euo pipefail\n" in text
    assert '"${1:-${OUT:-' in text  # logs under $1, else $OUT
    assert "exit $status" in text


def test_gpu_check_budgets_match_the_header_and_fit_8_minutes() -> None:
    declared, used, grace = _budgets((ROOT / "scripts/gpu_check.sh").read_text())
    assert declared == used and len(used) >= 5, (declared, used)
    assert {"fsdp2_resume", "precisions", "train_step_1.5b"} <= set(used)
    assert sum(used.values()) + grace * len(used) < 8 * 60


def test_gpu_multi_check_declares_its_budgets_and_names_the_missing_vllm_test() -> None:
    text = (ROOT / "scripts/gpu_multi_check.sh").read_text()
    declared, used, _ = _budgets(text)
    assert declared == used, (declared, used)
    assert "torch.distributed.run --standalone --nproc-per-node 2" in text and "conf/trainer/fsdp.yaml" in text
    assert "--ckpt_path=last" in text and "NOT YET WRITTEN" in text
