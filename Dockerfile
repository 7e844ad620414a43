# syntax=docker/dockerfile:1.7
#
# Two images from one file:
#
#   docker build --target operator -t ghcr.io/fermata-dev/fermata-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/fermata-dev/fermata-trainer:0.1.0  .
#
# operator: slim Python, the package without the `trainer` extra (no torch), `fermata operator`.
# trainer:  the same Python plus PyTorch 2.11.0 from PyPI. The PyPI wheels for Linux carry the CUDA
#           13.0 runtime, cuDNN and NCCL (cuda-toolkit / nvidia-*-cu13 wheels), so no CUDA base image
#           is needed; the NVIDIA container toolkit mounts the driver (NVIDIA_* variables below).
#           audiocraft 1.3.0 pins torch 2.1, so it and xformers go in with --no-deps on top of their
#           real runtime dependencies (the `trainer` extra), exactly as `make venv` does.
# Both run as the numeric non-root user 1000 (the operator's FERMATA_TRAINER_UID default), so they
# pass the `restricted` Pod Security level with runAsNonRoot.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --gid 1000 fermata \
 && useradd --uid 1000 --gid 1000 --home-dir /home/fermata --create-home --shell /usr/sbin/nologin fermata
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
COPY api ./api
COPY kubectl ./kubectl

# ------------------------------------------------------------------------------------------ operator
FROM base AS operator
RUN pip install --upgrade pip==26.3 \
 && pip install . \
 && rm -rf /src
WORKDIR /home/fermata
USER 1000:1000
# 8080: Prometheus metrics (FERMATA_METRICS_PORT); 8081: kopf liveness (--liveness).
ENV FERMATA_METRICS_PORT=8080
EXPOSE 8080 8081
ENTRYPOINT ["fermata", "operator"]
CMD ["--liveness", "http://0.0.0.0:8081/healthz"]

# ------------------------------------------------------------------------------------------- trainer
FROM base AS trainer
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
 && rm -rf /var/lib/apt/lists/*
RUN pip install --upgrade pip==26.3 \
 && pip install torch==2.11.0 torchaudio==2.11.0 \
 && pip install '.[trainer]' \
 && pip install --no-deps audiocraft==1.3.0 xformers==0.0.35 \
 && rm -rf /src
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp \
    HF_HOME=/tmp/hf
WORKDIR /home/fermata
USER 1000:1000
ENTRYPOINT ["fermata-train"]
CMD ["run"]
