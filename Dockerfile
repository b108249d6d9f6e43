# syntax=docker/dockerfile:1
# cosmos-recipes on an NGC PyTorch container: `make docker` builds it (docker build -t cosmos-recipes:latest .).
#
# Base image. The default, NGC PyTorch release 26.05 (nvcr.io/nvidia/pytorch:26.05-py3), ships
# Ubuntu 24.04 with Python 3.12, PyTorch 2.12.0a0+5aff3928d8.nv26.05 built against CUDA 13.2,
# NCCL 2.30.4, and Transformer Engine and DALI preinstalled (NGC's PyTorch containers carry both).
# pyproject.toml asks for torch>=2.11,<3: releases 26.02 and 26.03 ship 2.11.0a0, a pre-release that
# PEP 440 sorts *below* 2.11, so 26.04 is the oldest NGC release that fits (the install step below
# stops with a message when the base's torch does not fit). Another release:
#   make docker BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 -t cosmos-recipes .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.05-py3
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

LABEL org.opencontainers.image.title="cosmos-recipes" \
      org.opencontainers.image.description="Post-training recipes for Cosmos world models on megatron-core (NGC PyTorch base)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# NCCL settings (NCCL_NVLS_ENABLE, NCCL_IB_*, ...) are left to the base image and the cluster
# (launchers/env/*.env): nothing here forces them.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same path as the Slurm launcher's default container workdir (launcher.container_workdir).
WORKDIR /workspace/cosmos-recipes

# The make targets need make (NGC images have it; this only matters for another BASE_IMAGE).
# hadolint ignore=DL3008
RUN command -v make >/dev/null || { apt-get update && apt-get install -y --no-install-recommends make \
      && rm -rf /var/lib/apt/lists/*; }

# Keep the base image's CUDA stack for later `pip install`s in the container too: this constraints file
# pins torch & co (tools/envlock.py's list: torch, triton, numpy, DALI, Transformer Engine, ...) at the
# versions the base image has, so pip cannot replace them (with a PyPI build of another CUDA) while
# resolving a user's package; a dependency that needs another version fails instead of silently
# swapping it. It replaces NGC's own PIP_CONSTRAINT (/etc/pip/constraint.txt, a pin of every package in
# the image), which would also freeze packages we do install at other versions (nemo_toolkit 3.0 pins
# hydra-core, omegaconf, lightning).
COPY tools/envlock.py /tmp/envlock.py
RUN mkdir -p /etc/pip \
 && python3 -m pip list --format=freeze 2>/dev/null | python3 /tmp/envlock.py keep > /etc/pip/cosmos-recipes-constraints.txt \
 && { grep -qi '^torch==' /etc/pip/cosmos-recipes-constraints.txt \
      || { echo "error: the base image has no torch: BASE_IMAGE must be an NGC PyTorch image (or another with torch)" >&2; exit 1; }; } \
 && echo "kept from the base image:" && cat /etc/pip/cosmos-recipes-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip/cosmos-recipes-constraints.txt

COPY . .

# The environment is the one `make setup` builds elsewhere, from the same requirements.lock:
# `make setup SYSTEM_SITE=1` makes `.venv` with --system-site-packages, so the base image's torch,
# triton, numpy, DALI and Transformer Engine ("torch & co", tools/envlock.py) are imported from the image
# itself, and installs every other locked package at its locked version, hash-checked and without
# dependency resolution (--no-deps: nothing can swap the base's packages). A package the base has at
# another version (NGC's lightning) is installed into the venv, where it shadows the base's; the
# locked packages that only torch & co need (CUDA libraries) are not installed. The same command
# checks the venv against the lock (tools/envlock.py check), writes a `torchrun` for the venv's Python
# into .venv/bin (torch's own starts its workers with the image's Python, which lacks our packages)
# and the Makefile's setup stamp (`make setup` in the image is a no-op). --without-pip is used where
# the base's python3 has no ensurepip (Ubuntu's). The last steps list the versions in use and compose
# a recipe through make.
RUN --mount=type=cache,target=/root/.cache/pip \
    make setup SYSTEM_SITE=1 \
 && .venv/bin/python -m pip list 2>/dev/null \
      | grep -iE '^(torch|triton|numpy|nvidia-dali[-a-z0-9]*|transformer[-_]engine[-_a-z0-9]*|megatron-core|nemo[-_]toolkit|lightning|hydra-core|diffusers) ' \
 && make recipe=general print-config >/dev/null \
 && mkdir -p runs data \
 && chmod 1777 runs data

# The venv first on PATH: `python`, `torchrun` and `pytest` are the venv's, also for commands that
# do not go through make (the Slurm launcher's `python -m nemo_ext.cli.launch task ...` under pyxis).
ENV VIRTUAL_ENV=/workspace/cosmos-recipes/.venv \
    PATH=/workspace/cosmos-recipes/.venv/bin:${PATH}

# runs/ (run directories, checkpoints) and data/ (the generated sample world) are world-writable for
# `docker run --user ...`; mount a host directory on runs/ to keep runs (see README).
# The base image's ENTRYPOINT (NVIDIA's banner + exec) is kept; with no command, `make help`.
CMD ["make", "help"]
