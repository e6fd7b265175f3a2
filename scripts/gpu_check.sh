#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (shared/docs/environment.md section 11): the GPU tests,
# then the training-step benchmark at the Qwen2.5-1.5B and Qwen2.5-7B shapes. Results (logs, JSON) go to
# ${OUT:-runs/gpu_check}. The image lacks a few pure-Python wheels; fetch them once on a machine with a
# package registry (`bash scripts/gpu_check.sh --fetch-wheels`) and carry `.whl` along (the device tool's
# run(command="bash scripts/gpu_check.sh", carry=[".whl"]); results come back under $OUT).
#   bash scripts/gpu_check.sh                 # ~8 min on one H200
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf "/.whl/\n/.whl-site/\n" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform any -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 \
        typeshed_client==2.15.0 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
    exit 0
fi
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl-site .whl/*.whl
    export PYTHONPATH="$PWD/.whl-site:$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
status=0
python3 -m pytest -m gpu tests/gpu -s -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1
for shape in qwen2.5-1.5b qwen2.5-7b; do
    python3 benchmarks/train_step.py --shape "$shape" --device cuda --json "$out/train_step_$shape.json" 2>&1 \
        | tee "$out/train_step_$shape.log" || status=1
done
grep -h "^RATIO" "$out"/train_step_*.log
exit $status
