#!/usr/bin/env bash
# Every one-GPU check in one go, for a lent GPU machine (one H100 80 GB or H200, 16 cores, no network, no vLLM;
# shared/docs/environment.md section 11). Weights are built from configs on the device: nothing is downloaded.
# Checks needing several GPUs or vLLM on a GPU are in scripts/gpu_multi_check.sh.
#
# Parts, in this order, each under `timeout` with its budget in seconds (plus GRACE seconds for a kill), so one
# slow part cannot eat the rest; budgets + grace: 435 + 5 x 5 = 460 s, under 8 minutes (tests/unit/test_gpu_scripts.py checks):
#   part               budget_s  what
#   setup                    15  carried wheels installed, nvidia-smi, CUDA visible to torch
#   fsdp2_resume             90  tests/gpu: the CLI fits FSDP2 on one GPU (a 1-rank mesh), resumes its shards
#   precisions              100  tests/gpu: a ~450 M model, 3 steps in each precision, GRPO and CAPO; chunked head
#   train_step_1.5b         120  benchmarks/train_step.py at Qwen2.5-1.5B, 96 x (512 + 1024) tokens, 2 rounds
#   train_step_7b           110  the same at Qwen2.5-7B in bf16 weights, 24 completions, 1 round
# The budgets are estimates (from a 1.5B KeepAll step of 7.1 s on an H200, before the chunked head); the
# script has not run on a GPU yet. A part that runs out is reported as `timeout`, and the next part starts.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # logs, JSON and summary.txt in $1, else $OUT, else runs/gpu_check
#   bash scripts/gpu_check.sh --fetch-wheels     # once, where a package registry is reachable: the pure-Python
#                                                # wheels the image lacks, into .whl (carry it: carry=[".whl"])
#   CAPO_GPU_DRY_RUN=1 PYTHON=.venv/bin/python GPU_CHECK_SCALE=4 bash scripts/gpu_check.sh /tmp/gpu_dry
#       # rehearsal on CPU: tests/gpu at their tiny CPU shape, the benchmark at a tiny SmolLM2 batch;
#       # GPU_CHECK_SCALE multiplies every budget (a busy CPU is slower)
# Prints a table of pass / fail / timeout per part at the end; exits non-zero if any part did not pass.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf "/.whl/\n/.whl-site/\n" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform any -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 \
        typeshed_client==2.15.0 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
    exit 0
fi
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
dry="${CAPO_GPU_DRY_RUN:-0}"
scale="${GPU_CHECK_SCALE:-1}"
. "$(dirname "${BASH_SOURCE[0]}")/gpu_parts.sh"  # GRACE, the environment, run_part
skip_part() {  # skip_part NAME BUDGET_S WHY
    names+=("$1") budgets+=("$(($2 * scale))") took+=(0) results+=("not run ($3)")
}

setup='if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl-site .whl/*.whl; fi'
if [ "$dry" = 1 ]; then
    setup="$setup; \"$py\" -c 'import torch; print(\"dry run on CPU, torch\", torch.__version__)'"
    bench_1p5b=(--shape smollm2-135m --device cpu --prompts 1 --samples 2 --prompt-len 8 --response-len 8 --micro 2
                --rounds 1 --warmup 0 --threads 1)
    bench_7b=("${bench_1p5b[@]}")
else
    setup="$setup; nvidia-smi --query-gpu=name,memory.total --format=csv; \"$py\" -c 'import torch; assert torch.cuda.is_available(), \"torch sees no CUDA device\"; print(torch.__version__, torch.cuda.get_device_name())'"
    bench_1p5b=(--shape qwen2.5-1.5b --device cuda --rounds 2 --warmup 1)
    bench_7b=(--shape qwen2.5-7b --device cuda --prompts 3 --rounds 1 --warmup 1)
fi
pytest=("$py" -m pytest -m gpu -s -q -p no:cacheprovider)

run_part setup 15 bash -c "$setup"
if [ "${results[0]}" = pass ]; then
    run_part fsdp2_resume 90 "${pytest[@]}" tests/gpu/test_gpu_fits.py -k fsdp2
    run_part precisions 100 "${pytest[@]}" tests/gpu -k "not fsdp2"
    run_part train_step_1.5b 120 "$py" benchmarks/train_step.py "${bench_1p5b[@]}" --json "$out/train_step_1.5b.json"
    run_part train_step_7b 110 "$py" benchmarks/train_step.py "${bench_7b[@]}" --json "$out/train_step_7b.json"
else
    skip_part fsdp2_resume 90 "setup failed"
    skip_part precisions 100 "setup failed"
    skip_part train_step_1.5b 120 "setup failed"
    skip_part train_step_7b 110 "setup failed"
fi

status=0
{
    grep -h "^shape\|^RATIO\|^KeepAll\|^CAPO\|^minimal" "$out"/train_step_*.log 2>/dev/null || true
    printf "\n%-18s %9s %7s  %s\n" part "budget s" "took s" result
    for i in "${!names[@]}"; do
        printf "%-18s %9s %7s  %s\n" "${names[$i]}" "${budgets[$i]}" "${took[$i]}" "${results[$i]}"
        [ "${results[$i]}" = pass ] || status=1
    done
    echo "logs: $out/<part>.log"
} | tee "$out/summary.txt"
exit $status
