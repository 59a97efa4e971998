# syntax=docker/dockerfile:1.7
# What runs in Crucible's training pods: PyTorch with CUDA, DeepSpeed, the trainer.
#   docker build -f images/trainer.Dockerfile -t crucible-trainer .
# The operator starts pods with `python -m crucible.trainer STAGE --spec FILE` (through torchrun
# when a run has several processes), so the image sets no entrypoint of its own.

# The -devel flavour carries nvcc: DeepSpeed compiles its fused CUDA ops on first use.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="crucible-trainer" \
      org.opencontainers.image.description="Crucible trainer: data pipeline, pretraining, fine-tuning, preference tuning, quantization" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
# Keep the base image's CUDA build of torch: pin it so no dependency drags in another wheel.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
 && pip install --constraint /tmp/torch-constraint.txt ".[trainer,deepspeed,eval]" \
 && python -c "import crucible.trainer.config, deepspeed, transformers" \
 && rm -rf /src /tmp/torch-constraint.txt

# A fixed numeric uid so Kubernetes' runAsNonRoot can verify it; its home holds the caches
# (DeepSpeed/Triton kernels, Hugging Face) so a read-only image still works.
RUN groupadd --gid 1000 crucible \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/crucible --shell /bin/bash crucible \
 && mkdir -p /workspace \
 && chown crucible:crucible /workspace
ENV HOME=/home/crucible \
    HF_HOME=/home/crucible/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/crucible/.cache/torch_extensions \
    TRITON_CACHE_DIR=/home/crucible/.cache/triton \
    HF_HUB_OFFLINE=1
WORKDIR /workspace
USER 1000:1000
# Rank 0's Prometheus endpoint (metrics.port in the spec).
EXPOSE 9400
CMD ["python", "-m", "crucible.trainer", "--help"]
