#!/usr/bin/env bash
# The CPU regime study (docs/results.md): each (regime, arm, seed) run of conf/study/ on SmolLM2-135M-Instruct.
# Resumable: a run with a `done` marker is skipped, a stopped one resumes from its last checkpoint. A finished
# run's logs (metrics.csv, every version joined; config.yaml, completions.jsonl, collapse.jsonl) go to docs/study/regimes/<run>/
# (commit them) and its checkpoints deleted (1.6 GB each).
#   bash scripts/study.sh                                   # every run, cheapest first
#   RUNS="aggressive:capo:0 conservative:grpo:1" bash scripts/study.sh
#   .venv/bin/capo report docs/study/regimes/* --out docs/study/regimes_report
set -euo pipefail
cd "$(dirname "$0")/.."
capo=".venv/bin/capo"
default_runs=""
for seed in 0 1 2; do
    for arm in grpo capo dr_grpo dr_capo; do default_runs+=" aggressive:$arm:$seed"; done
done
for seed in 0 1 2; do default_runs+=" conservative:grpo:$seed conservative:dr_grpo:$seed"; done
for run in ${RUNS:-$default_runs}; do
    IFS=: read -r regime arm seed <<< "$run"
    name="${regime}_${arm}_s${seed}"
    dir="runs/study/$name"
    if [ -f "$dir/done" ]; then echo "skip $name (done)"; continue; fi
    resume=()
    if compgen -G "$dir/checkpoints/last*.ckpt" > /dev/null; then resume=(--ckpt_path last); echo "resume $name"; fi
    start=$(date +%s)
    "$capo" fit --config conf/study/base.yaml --regime "conf/regime/$regime.yaml" --config "conf/study/$arm.yaml" \
        --seed_everything "$seed" --trainer.default_root_dir "$dir" "${resume[@]}"
    logs=$(ls -d "$dir"/logs/version_* | sort -V | tail -1)
    mkdir -p "docs/study/regimes/$name"
    cp "$logs"/config.yaml "docs/study/regimes/$name/"
    # a resumed run logged to several versions: commit them joined (capo_lightning/report/versions.py)
    .venv/bin/python -c "import sys; from pathlib import Path; from capo_lightning.report.runs import load_run
from capo_lightning.report.versions import write_rows; write_rows(load_run(sys.argv[1]).rows, Path(sys.argv[2]))" \
        "$dir" "docs/study/regimes/$name/metrics.csv"
    for extra in completions.jsonl collapse.jsonl; do
        if [ -f "$logs/$extra" ]; then cp "$logs/$extra" "docs/study/regimes/$name/"; fi
    done
    echo "$(( $(date +%s) - start )) s" > "docs/study/regimes/$name/wall_time.txt"
    rm -rf "$dir/checkpoints"
    touch "$dir/done"
    echo "finished $name in $(( $(date +%s) - start )) s"
done
