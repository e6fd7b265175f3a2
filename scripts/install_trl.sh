#!/usr/bin/env bash
# Create .venv-trl: TRL's GRPOTrainer for benchmarks/vs_trl.py, in its own environment so TRL and its
# dependencies never change the main one. CPU torch first (otherwise pip resolves a multi-GB CUDA
# torch), the same torch and transformers as .venv (so both sides run the same generate() and kernels),
# then TRL 1.16.0, the release the issue's first measurement used. capo_lightning itself is NOT
# installed: the benchmark hands this environment its prompts as a JSON file and puts the repository
# root on the path only to grade with capo's own reward (capo_lightning.rewards: plain Python + torch,
# and math-verify, at capo's pins, for the answers it cannot settle as plain numbers).
#   bash scripts/install_trl.sh && .venv/bin/python benchmarks/vs_trl.py
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-trl
.venv-trl/bin/python -m pip install -q --upgrade pip
.venv-trl/bin/python -m pip install -q "torch==2.13.0"
.venv-trl/bin/python -m pip install -q "transformers==5.24.0" "trl==1.16.0" \
    "math-verify==0.9.0" "latex2sympy2_extended==1.11.0"
echo "installed into $(pwd)/.venv-trl"
