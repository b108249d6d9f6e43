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

# Keep the base image's CUDA stack. pip would otherwise be free to replace torch (with a PyPI build
# of another CUDA), numpy (which torch and DALI are built against), DALI or Transformer Engine while
# resolving our dependencies. This constraints file pins exactly those packages at the versions the
# base image has; an installed package that satisfies its pin is kept, and a dependency that needs
# another version fails the build instead of silently swapping it. It replaces NGC's own
# PIP_CONSTRAINT (/etc/pip/constraint.txt, a pin of every package in the image), which would also
# freeze packages we do need to upgrade (nemo_toolkit 3.0 pins hydra-core, omegaconf, lightning).
# PIP_CONSTRAINT stays set in the image, so a later `pip install` in the container keeps them too.
RUN mkdir -p /etc/pip \
 && python3 -m pip list --format=freeze 2>/dev/null \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|numpy|apex|nvidia[-_]dali[-_a-z0-9]*|transformer[-_]engine[-_a-z0-9]*|flash[-_]attn[-_a-z0-9]*)==' \
      > /etc/pip/cosmos-recipes-constraints.txt \
 && { grep -qi '^torch==' /etc/pip/cosmos-recipes-constraints.txt \
      || { echo "error: the base image has no torch: BASE_IMAGE must be an NGC PyTorch image" >&2; exit 1; }; } \
 && echo "kept from the base image:" && cat /etc/pip/cosmos-recipes-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip/cosmos-recipes-constraints.txt

COPY . .

# The environment the Makefile expects: `.venv/bin/python` (its need_venv check), built like
# `make setup WHEELS=<dir>` does on the offline GPU machines: a venv with --system-site-packages, so
# the base image's torch, triton, numpy, DALI and Transformer Engine are imported from the image
# itself and the venv only holds what is missing (megatron-core, NeMo, diffusers, ...). The `dali`
# and `te` extras are not installed: the base image provides both. --without-pip: the venv uses the
# image's pip through the system site-packages (Ubuntu's python3 may lack ensurepip).
# torch's own `torchrun` script lives outside the venv and starts its workers with the image's
# Python, which lacks our packages: a `torchrun` for the venv's Python is written into .venv/bin
# (`make train NGPU=N` itself runs `python -m torch.distributed.run`). `.venv/.installed` is the
# Makefile's setup stamp: `make setup` in the image is a no-op. The last steps check what pip did
# (torch is still the base image's), list the versions in use, and compose a recipe through make.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv --system-site-packages --without-pip .venv \
 && { .venv/bin/python -m pip install -e ".[test]" \
      || { echo "error: pip could not install cosmos-recipes on ${BASE_IMAGE} while keeping its" \
                "packages ($(tr '\n' ' ' < "$PIP_CONSTRAINT")). If torch is the conflict, pick a BASE_IMAGE" \
                "whose torch satisfies pyproject.toml (NGC 26.04 or newer)." >&2; exit 1; }; } \
 && if [ -n "$(find .venv/lib -mindepth 3 -maxdepth 3 -name torch)" ]; then \
      echo "error: pip installed a second torch into .venv" >&2; exit 1; fi \
 && { [ -e .venv/bin/torchrun ] \
      || printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' \
           "$PWD/.venv/bin/python" > .venv/bin/torchrun; } \
 && chmod 755 .venv/bin/torchrun \
 && touch .venv/.installed \
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
