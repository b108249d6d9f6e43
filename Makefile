# cosmos-recipes: every target is a thin wrapper over `python -m nemo_ext.cli.<cli>`.
# `make help` lists the targets and variables.

SHELL := /bin/bash
.DEFAULT_GOAL := help

recipe ?= general
FAMILY ?= diffusion
MODEL ?=
DATA ?=
NGPU ?=
ARGS ?=
WHEELS ?=

VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

ifneq ($(filter-out diffusion ar,$(FAMILY)),)
$(error FAMILY=$(FAMILY): expected diffusion or ar)
endif

# NGPU: unset or 0 = CPU, 1 = one GPU, N > 1 = torchrun with N processes on this node
# (launchers/local.sh does the launching; the device argument here is for print-config).
ifeq ($(filter-out 0,$(strip $(NGPU))),)
  DEVICE_ARG := trainer.device=cpu
else
  DEVICE_ARG := trainer.device=gpu
endif

# Slurm (make slurm / sweep): each variable set becomes a launcher.* override.
NODES ?=
GPUS_PER_NODE ?=
PARTITION ?=
ACCOUNT ?=
TIME ?=
CONTAINER ?=
MOUNTS ?=
SWEEP ?=
NAME ?=
RUN ?=
DRY_RUN ?=
comma := ,
SLURM_ARGS := $(if $(NODES),launcher.nodes=$(NODES)) $(if $(GPUS_PER_NODE),launcher.gpus_per_node=$(GPUS_PER_NODE)) \
  $(if $(PARTITION),launcher.partition=$(PARTITION)) $(if $(ACCOUNT),launcher.account=$(ACCOUNT)) \
  $(if $(TIME),launcher.time=$(TIME)) $(if $(CONTAINER),launcher.container=$(CONTAINER)) \
  $(if $(MOUNTS),'launcher.mounts=[$(MOUNTS)]')
# argparse: options before the overrides (RECIPE_ARGS ends with positional overrides).
LAUNCH_FLAGS := $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

RECIPE_ARGS := --recipe $(recipe) --family $(FAMILY) $(if $(MODEL),model=$(MODEL)) $(if $(DATA),data.path=$(DATA))

CMD ?=
CKPT ?=
FROM ?=
TO ?=

.PHONY: help setup lock wheels test-docker train slurm sweep sweep-report print-config convert sample eval test test-full sample-data data clean-venv docker

help: ## Show targets and variables
	@echo "cosmos-recipes: post-training recipes for Cosmos world foundation models"
	@echo
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo
	@echo "Variables:"
	@echo "  recipe=<task>      recipe folder under recipes/ (default: general)"
	@echo "  FAMILY=diffusion|ar  model family (default: diffusion)"
	@echo "  MODEL=<preset>     model preset, e.g. dit_tiny dit_7b dit_14b"
	@echo "  DATA=<dir|glob>    shard directory; unset = the generated sample world"
	@echo "  NGPU=<n>           unset/0 = CPU, 1 = one GPU, n > 1 = torchrun with n processes"
	@echo "  ARGS=\"...\"         Hydra overrides, e.g. ARGS=\"trainer.max_steps=10 optim.lr=1e-5\""
	@echo "  WHEELS=<dir>       (setup) offline: keep this Python's torch & co, the rest of the lock from <dir>;"
	@echo "                     (wheels) where to download them; FREEZE=<file> the target's pip list --format=freeze"
	@echo "  Slurm (slurm, sweep): NODES= GPUS_PER_NODE= (0 = CPU nodes) PARTITION= ACCOUNT= TIME= CONTAINER=<image>"
	@echo "                     MOUNTS=src:dst,... DRY_RUN=1 (print the script only); sweep: SWEEP=\"k=v1,v2 k2=v3\" NAME="
	@echo "  RUN=<sweep dir>    (sweep-report) the sweep to tabulate"
	@echo "  CKPT=<dir|last>    (sample, eval) run dir, checkpoint dir, or last: the newest run of recipe/FAMILY/MODEL"
	@echo
	@if [ -x $(PY) ]; then $(PY) -m nemo_ext.cli.registry 2>/dev/null || true; fi
	@echo
	@echo "Example: make setup && make recipe=general train"

# A Python 3.12 (megatron-core >= 0.17 requires it): python3.12 on PATH, pyenv's 3.12.*, /usr/bin, python3.
define find_python
py=""; \
for cand in "$$(command -v python3.12 2>/dev/null)" \
            $$(ls -d "$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r) \
            /usr/bin/python3.12 /usr/local/bin/python3.12 "$$(command -v python3 2>/dev/null)"; do \
  [ -n "$$cand" ] && [ -x "$$cand" ] || continue; \
  if "$$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; then py="$$cand"; break; fi; \
done; \
if [ -z "$$py" ]; then \
  echo "error: no Python 3.12 found (looked at python3.12 on PATH, pyenv's versions/3.12.*, /usr/bin, python3)."; \
  echo "  megatron-core >= 0.17 requires Python 3.12. Install one, e.g.:"; \
  echo "    pyenv install 3.12      (then re-run make setup)"; \
  echo "    apt-get install python3.12 python3.12-venv   (Debian/Ubuntu with 3.12 packages)"; \
  echo "    uv python install 3.12"; \
  exit 1; \
fi
endef

# The environment is requirements.lock (every package, exact versions, sha256 hashes), made by `make lock`
# from pyproject.toml's ranges; tools/envlock.py installs and checks it. Default: a venv of its own with
# exactly the lock. WHEELS=<dir>: offline, on a machine that ships torch & co (GPU machines, NGC
# containers): a --system-site-packages venv that keeps the base's torch & co and installs the rest of
# the lock from <dir> (made by `make wheels`); SYSTEM_SITE=1: the same from the index (the Dockerfile).
LOCKFILE := requirements.lock
SYSTEM_SITE ?=
$(VENV)/.installed: pyproject.toml $(LOCKFILE)
	@set -e; \
	$(find_python); \
	echo "using $$py ($$($$py --version))"; \
	if [ -n "$(WHEELS)$(SYSTEM_SITE)" ]; then \
	  $$py -m venv --system-site-packages $(VENV) 2>/dev/null || { rm -rf $(VENV); $$py -m venv --system-site-packages --without-pip $(VENV); }; \
	  parent=$$($$py -c 'import site; print(site.getsitepackages()[0])'); \
	  echo "$$parent" > $$($(VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_parent_site.pth; \
	  $(VENV)/bin/python tools/envlock.py install --python $(VENV)/bin/python $(if $(WHEELS),--wheels "$(WHEELS)"); \
	  $(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .; \
	  [ -e $(VENV)/bin/torchrun ] || printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' \
	    "$$PWD/$(VENV)/bin/python" > $(VENV)/bin/torchrun && chmod 755 $(VENV)/bin/torchrun; \
	  $(VENV)/bin/python -m pip check || echo "warning: pip check (above) also sees the base's own packages; tools/envlock.py check is what must pass"; \
	else \
	  $$py -m venv $(VENV); \
	  $(VENV)/bin/pip install --require-hashes --no-deps -r $(LOCKFILE); \
	  $(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .; \
	  $(VENV)/bin/pip check; \
	fi; \
	$(VENV)/bin/python tools/envlock.py check --python $(VENV)/bin/python; \
	touch $@

setup: $(VENV)/.installed ## Create .venv with Python 3.12: exactly requirements.lock (WHEELS=<dir>: offline, on a base that ships torch)
	@echo "environment ready: $(VENV) ($$($(PY) --version))"

# make lock: uv (pinned here) in a tools venv of its own resolves pyproject.toml's ranges afresh for
# CPython 3.12 on x86-64 Linux, with the install tools (pip, setuptools, wheel) and the extras setup
# installs, honouring the pip constraint file this machine's pip config names (it caps torch here).
UV_VERSION := 0.13.9
TOOLS := .tools
LOCK_CONSTRAINTS ?= $(PIP_CONSTRAINT) $(shell pip config list 2>/dev/null | sed -n "s/^[a-z]*\.constraint='\(.*\)'$$/\1/p")
lock: ## Re-resolve requirements.lock from pyproject.toml's ranges (after changing dependencies, or to take new releases)
	@set -e; $(find_python); \
	[ -x $(TOOLS)/uv-$(UV_VERSION)/bin/uv ] || { $$py -m venv $(TOOLS)/uv-$(UV_VERSION) && $(TOOLS)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION); }; \
	printf 'pip\nsetuptools>=77\nwheel\n' | $(TOOLS)/uv-$(UV_VERSION)/bin/uv pip compile pyproject.toml - --extra dali --extra test \
	  --python-version 3.12 --python-platform x86_64-manylinux_2_28 --generate-hashes --upgrade \
	  $(foreach c,$(LOCK_CONSTRAINTS),--constraint $(c)) --custom-compile-command "make lock" -o $(LOCKFILE) --quiet; \
	echo "$(LOCKFILE): $$(grep -c '^[a-z0-9]' $(LOCKFILE)) packages; torch $$(sed -n 's/^torch==\([^ ]*\).*/\1/p' $(LOCKFILE)); run make clean-venv setup test"

# make wheels: the lock's wheels a machine without internet needs (FREEZE=<its pip list --format=freeze>;
# default: a machine that has torch & co only), in folders that fit one device call each.
FREEZE ?=
wheels: ## Download the wheels an offline machine needs: make wheels WHEELS=<dir> [FREEZE=<its pip freeze>]
	@test -n "$(WHEELS)" || { echo "usage: make wheels WHEELS=<dir> [FREEZE=<file of the machine's pip list --format=freeze>]"; exit 2; }
	@set -e; $(find_python); $$py tools/envlock.py fetch --dest "$(WHEELS)" $(if $(FREEZE),--freeze "$(FREEZE)")

define need_venv
	@test -x $(PY) || { echo "error: $(VENV) is missing: run 'make setup' first"; exit 1; }
endef

train: ## Post-train here: make recipe=<task> train [MODEL= DATA= NGPU= ARGS=] (launchers/local.sh)
	$(need_venv)
	NGPU=$(NGPU) PYTHON=$(PY) launchers/local.sh $(RECIPE_ARGS) $(ARGS)

slurm: ## Submit to Slurm: make recipe=<task> slurm NODES=n [GPUS_PER_NODE= PARTITION= ACCOUNT= TIME= CONTAINER= MOUNTS= ARGS= DRY_RUN=1]
	$(need_venv)
	$(PY) -m nemo_ext.cli.launch slurm $(LAUNCH_FLAGS) $(RECIPE_ARGS) $(SLURM_ARGS) $(ARGS)

sweep: ## Sweep as a Slurm job array: make recipe=<task> sweep SWEEP="optim.lr=1e-5,3e-5 trainer.max_steps=100" [NAME= + slurm vars]
	$(need_venv)
	@test -n "$(SWEEP)" || { echo 'usage: make recipe=<task> sweep SWEEP="key=v1,v2 key2=v3" [NAME=<sweep name>] [NODES= ... ARGS=]'; exit 2; }
	$(PY) -m nemo_ext.cli.launch sweep $(LAUNCH_FLAGS) --sweep '$(SWEEP)' $(if $(NAME),--name $(NAME)) $(RECIPE_ARGS) $(SLURM_ARGS) $(ARGS)

sweep-report: ## Tabulate a sweep's validation losses: make sweep-report RUN=runs/<recipe>/<family>_<model>/<sweep name>
	$(need_venv)
	@test -n "$(RUN)" || { echo "usage: make sweep-report RUN=<sweep directory>"; exit 2; }
	@$(PY) -m nemo_ext.cli.launch sweep-report $(RUN)

print-config: ## Print the resolved config of a recipe (with MODEL/DATA/ARGS applied)
	$(need_venv)
	@$(PY) -m nemo_ext.cli.train $(RECIPE_ARGS) $(DEVICE_ARG) $(ARGS) --print-config

convert: ## Convert checkpoints: make convert CMD=import|export FROM=<dir> TO=<dir> [MODEL=dit_7b]
	$(need_venv)
	@test -n "$(CMD)" -a -n "$(FROM)" -a -n "$(TO)" || { echo "usage: make convert CMD=import|export FROM=<dir> TO=<dir> [MODEL=<preset>]"; exit 2; }
	$(PY) -m nemo_ext.cli.convert $(CMD) --from $(FROM) --to $(TO) $(if $(and $(MODEL),$(filter import,$(CMD))),--model $(MODEL)) $(ARGS)

# CKPT=last: the newest run of recipe/FAMILY/MODEL (runs/<recipe>/<family>_<model>/...); a run or
# checkpoint directory carries its own config. ARGS: sample options (--prompt, --from-data, ...).
SAMPLE_LAST_ARGS = $(if $(filter last,$(CKPT)),--recipe $(recipe) --family $(FAMILY) $(if $(MODEL),--model $(MODEL)))

sample: ## Generate a video (mp4): make sample CKPT=<run|checkpoint dir|last> [FAMILY= MODEL= ARGS="--prompt '...' --from-data --side-by-side"]
	$(need_venv)
	@test -n "$(CKPT)" || { echo "usage: make sample CKPT=<run dir|checkpoint dir|last> [recipe= FAMILY= MODEL=] [ARGS=\"--prompt '...' --video in.mp4 | --from-data ...\"]"; exit 2; }
	$(PY) -m nemo_ext.cli.sample --ckpt $(CKPT) $(SAMPLE_LAST_ARGS) $(ARGS)

eval: ## Evaluate a run with its task's eval: make recipe=action_control eval CKPT=<run|checkpoint dir|last> [FAMILY= MODEL= ARGS="--episodes 8 --steps 2"]
	$(need_venv)
	@test -n "$(CKPT)" || { echo "usage: make recipe=<task> eval CKPT=<run dir|checkpoint dir|last> [FAMILY= MODEL=] [ARGS=\"--episodes N --split val|train --steps K --shuffle-seed S --out DIR\"]"; exit 2; }
	$(PY) -m nemo_ext.cli.eval --ckpt $(CKPT) $(SAMPLE_LAST_ARGS) $(ARGS)

sample-data: ## Generate the procedural sample world of a recipe into data/sample/<variant>/
	$(need_venv)
	$(PY) -m nemo_ext.cli.prep sample --recipe $(recipe) $(ARGS)

# Data prep source: a converter registered by a module of data_prep/ (`make help` lists them, from the registry).
# OUT is taken from the command line only: the GPU machines export an OUT of their own, and
# writing shards there by accident would be bad; `$(origin OUT)` tells the two apart.
PREP_SOURCE = $(if $(SOURCE),$(SOURCE),videos)
DATA_USAGE = usage: make recipe=<task> data RAW=<raw dir> OUT=<out dir> [SOURCE=<source> (default videos; make help lists them)] [ARGS="..."]
DATA_OUT_FROM_ENV = OUT=$(OUT) comes from the environment (origin: $(origin OUT)) and is refused: \
  give the output dir on the make command line: make recipe=$(recipe) data RAW=<raw dir> OUT=<out dir>

data: ## Prepare shards: make recipe=<task> data RAW=<raw dir> OUT=<out dir> [ARGS=...]
	$(if $(filter environment%,$(origin OUT)),$(error $(DATA_OUT_FROM_ENV)))
	$(if $(and $(strip $(RAW)),$(strip $(OUT))),,$(error RAW and OUT are required. $(DATA_USAGE)))
	$(need_venv)
	$(PY) -m nemo_ext.cli.prep $(PREP_SOURCE) --recipe $(recipe) --raw $(RAW) --out $(OUT) $(ARGS)

test: ## Run the CPU test suite (the CI suite)
	$(need_venv)
	$(PYTEST) -m "not gpu and not multigpu and not slow" tests

test-full: ## Run every test: the full parallel-equivalence matrix (+ GPU tests where GPUs exist)
	$(need_venv)
	$(PYTEST) tests

clean-venv: ## Remove .venv
	rm -rf $(VENV)

# Docker image (Dockerfile: NGC PyTorch base + this package in .venv; README "Docker and enroot/pyxis").
# `docker build` where `docker info` reaches a daemon, else buildah (as root, with chroot
# isolation: no daemon needed; --format docker: the OCI format would drop the Dockerfile's SHELL with
# its pipefail), else an error that says what to install.
IMAGE ?= cosmos-recipes:latest
BASE_IMAGE ?=
DOCKER ?= docker
BUILDAH ?= buildah
BUILD_ARGS = $(if $(strip $(BASE_IMAGE)),--build-arg BASE_IMAGE=$(BASE_IMAGE))

docker: ## Build the image: make docker [IMAGE=cosmos-recipes:latest BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3] (docker, else buildah)
	@if command -v $(DOCKER) >/dev/null 2>&1 && $(DOCKER) info >/dev/null 2>&1; then \
	  echo "$(DOCKER) build -t $(IMAGE) $(BUILD_ARGS) -f Dockerfile ."; \
	  $(DOCKER) build -t $(IMAGE) $(BUILD_ARGS) -f Dockerfile .; \
	elif command -v $(BUILDAH) >/dev/null 2>&1; then \
	  echo "no Docker daemon ('$(DOCKER) info' fails or '$(DOCKER)' is not installed): building with $(BUILDAH)"; \
	  echo "$(BUILDAH) bud --isolation chroot --format docker --layers -t $(IMAGE) $(BUILD_ARGS) -f Dockerfile ."; \
	  $(BUILDAH) bud --isolation chroot --format docker --layers -t $(IMAGE) $(BUILD_ARGS) -f Dockerfile .; \
	else \
	  echo "error: neither a Docker daemon ('$(DOCKER) info' fails or '$(DOCKER)' is not installed) nor $(BUILDAH): install" \
	       "Docker (or DOCKER=podman), or buildah (apt-get install buildah; builds as root without a daemon)"; exit 1; \
	fi

test-docker: ## Build the image on a stand-in base (debootstrap + this Python + the locked torch) and train inside it (root; apt installs buildah, debootstrap)
	tools/test-docker.sh

print-python: # the Python 3.12 make setup uses (tools/test-docker.sh)
	@set -e; $(find_python); echo "$$py"
