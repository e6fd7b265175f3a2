#!/usr/bin/env bash
# The README figure's runs: the quickstart with GRPO (its shifts measured by capo_monitor) and with CAPO,
# two seeds each, then `capo report` over them. Resumable: a run whose last.ckpt reached max_steps is skipped,
# an interrupted one resumes from its last checkpoint. About 8 minutes a run on 2 CPU cores.
#   bash scripts/quickstart_study.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/quickstart_study}"
capo=".venv/bin/capo"
for seed in 0 1; do
    for arm in capo_monitor capo; do
        dir="$out/${arm}_s$seed"
        if [ -f "$dir/done" ]; then echo "skip $dir (done)"; continue; fi
        resume=()
        if [ -f "$dir/checkpoints/last.ckpt" ]; then resume=(--ckpt_path last); fi
        "$capo" fit --config conf/quickstart.yaml --config "conf/selector/$arm.yaml" \
            --seed_everything "$seed" --data.seed "$seed" --trainer.default_root_dir "$dir" "${resume[@]}"
        touch "$dir/done"
    done
done
"$capo" report "$out"/*_s* --out "$out/report"
