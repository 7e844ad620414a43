# syntax=docker/dockerfile:1.7
#
# Two images from one file, both on Debian bookworm's own Python 3.11 in a virtual environment
# under /opt/fermata:
#
#   docker build --target operator -t ghcr.io/fermata-dev/fermata-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/fermata-dev/fermata-trainer:0.1.0  .
#
# or, without a container engine, `make images` (buildah, chroot isolation, vfs storage; the base
# image is made by debootstrap the way debian:bookworm-slim is, and passed in as BASE_IMAGE).
#
# operator: the package without the `trainer` extra (no torch), entry point `fermata operator`.
# trainer:  the same Python plus PyTorch 2.11.0 from PyPI. The PyPI wheels for Linux carry the CUDA
#           13.0 runtime, cuDNN and NCCL (nvidia-*-cu13 wheels), so no CUDA base image is needed;
#           the NVIDIA container toolkit mounts the driver (NVIDIA_* variables below). ffmpeg and
#           libsndfile decode audio. audiocraft 1.3.0 pins torch 2.1, so it and xformers go in with
#           --no-deps on top of their real runtime dependencies (the `trainer` extra), exactly as
#           `make venv` does.
# Both run as the numeric non-root user 1000 (the operator's FERMATA_TRAINER_UID default), pass the
# `restricted` Pod Security level, and need nothing writable outside their volumes: the trainer
# writes only /tmp (HOME, the Hugging Face cache, scratch: an emptyDir in its pod), the operator
# nothing. Wheels are cached across builds (a cache mount); nothing of a build stays in the image:
# no compiler, no apt lists, no pip cache, no source tree.
#
# Behind a private index or a TLS-inspecting proxy, hand pip its settings as build secrets (they
# are mounted for the pip steps only and never stored in a layer); `make images` does so from the
# host's own pip configuration:
#   --secret id=pip.conf,src=pip.conf       e.g. [global] index-url = ... / cert = /etc/ssl/certs/build-ca.crt
#   --secret id=build-ca.crt,src=ca.crt     the CA bundle that pip.conf names

ARG BASE_IMAGE=debian:bookworm-slim
ARG VERSION=0.1.0

# -------------------------------------------------------------------------------------------- python
FROM ${BASE_IMAGE} AS python
ARG VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log \
 && python3.11 -m venv /opt/fermata \
 && groupadd --gid 1000 fermata \
 && useradd --uid 1000 --gid 1000 --home-dir /home/fermata --create-home --shell /usr/sbin/nologin fermata
ENV PATH=/opt/fermata/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/fermata \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
LABEL org.opencontainers.image.source="https://github.com/fermata-dev/fermata" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Fermata"

# ------------------------------------------------------------------------------------------ operator
FROM python AS operator
# The source is bind-mounted and copied to /tmp for the wheel build (pip builds in the tree).
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=build-ca.crt,target=/etc/ssl/certs/build-ca.crt \
    --mount=type=bind,source=.,target=/context \
    mkdir /tmp/src \
 && cp -r /context/pyproject.toml /context/README.md /context/api /context/operator \
          /context/trainer /context/kubectl /tmp/src/ \
 && pip install --upgrade pip==26.3 \
 && pip install /tmp/src \
 && rm -rf /tmp/src /tmp/pip-*
LABEL org.opencontainers.image.title="fermata-operator" \
      org.opencontainers.image.description="Fermata operator: TrainingRuns on spot GPUs inside a dollar budget"
WORKDIR /home/fermata
USER 1000:1000
# 8080: Prometheus metrics (FERMATA_METRICS_PORT); 8081: kopf liveness (--liveness).
ENV FERMATA_METRICS_PORT=8080
EXPOSE 8080 8081
ENTRYPOINT ["fermata", "operator"]
CMD ["--liveness", "http://0.0.0.0:8081/healthz"]

# ------------------------------------------------------------------------------------------- trainer
FROM python AS trainer
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log
# torch first, in a step of its own: a change to Fermata's source does not download it again.
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=build-ca.crt,target=/etc/ssl/certs/build-ca.crt \
    pip install --upgrade pip==26.3 \
 && pip install torch==2.11.0 torchaudio==2.11.0
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=build-ca.crt,target=/etc/ssl/certs/build-ca.crt \
    --mount=type=bind,source=.,target=/context \
    mkdir /tmp/src \
 && cp -r /context/pyproject.toml /context/README.md /context/api /context/operator \
          /context/trainer /context/kubectl /tmp/src/ \
 && pip install '/tmp/src[trainer]' \
 && pip install --no-deps audiocraft==1.3.0 xformers==0.0.35 \
 && rm -rf /tmp/src /tmp/pip-*
LABEL org.opencontainers.image.title="fermata-trainer" \
      org.opencontainers.image.description="Fermata trainer: MusicGen fine-tuning with audiocraft"
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp \
    HF_HOME=/tmp/hf
WORKDIR /home/fermata
USER 1000:1000
ENTRYPOINT ["fermata-train"]
CMD ["run"]
