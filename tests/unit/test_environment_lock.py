"""The locked environment: this venv is requirements.lock, the lock agrees with pyproject.toml, and
tools/envlock.py plans, packs and reassembles what an offline machine (torch & co of its own) needs."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from support import REPO


def _envlock():
    spec = importlib.util.spec_from_file_location("envlock", REPO / "tools" / "envlock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["envlock"] = module
    spec.loader.exec_module(module)
    return module


envlock = _envlock()


def test_this_venv_is_the_lock():
    """`make setup` built this venv: exactly the locked versions (every package, nothing else); in a
    --system-site-packages venv (make setup WHEELS=/SYSTEM_SITE=1) the venv's own packages are locked
    versions and everything else it imports is the lock's, except the base's torch & co."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "envlock.py"), "check", "--python", sys.executable],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_lock_satisfies_pyproject():
    """Every requirement of pyproject.toml (and of the extras make setup installs) is locked at a version
    in its range: a changed pyproject without `make lock` fails here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = envlock.read_lock()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dali"]
              + project["optional-dependencies"]["test"]]
    for req in wanted:
        name = envlock.canonical(req.name)
        assert name in lock, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(lock[name].version, prereleases=True), (str(req), lock[name].version)
        assert lock[name].hashes, f"{name} has no hashes in the lock"
    assert {"pip", "setuptools", "wheel"} <= lock.keys()
    assert not any(n.startswith("transformer-engine") for n in lock), "TE is GPU-only: never locked"


GPU_MACHINE = """\
torch==2.11.0+cu130
triton==3.6.0
numpy==2.5.2
lightning==2.6.6
pytorch-lightning==2.6.6
nvidia-cublas==13.1.0.3
sympy==1.14.0
huggingface-hub==1.33.0
"""


def test_plan_keeps_torch_and_co_and_takes_the_lock_for_everything_else():
    lock = envlock.read_lock()
    todo = envlock.plan(lock, envlock.read_freeze(GPU_MACHINE))
    install = {e.name: e.version for e in todo.install}
    assert todo.kept == {"torch": "2.11.0+cu130", "triton": "3.6.0", "numpy": "2.5.2"}
    # a by-name match would keep the machine's lightning 2.6.6, which NeMo 3.0 cannot use
    assert install["lightning"] == lock["lightning"].version != "2.6.6"
    # pydantic (imported by nv_one_logger at `import nemo.core`) is missing there: it is installed
    assert "pydantic" in install and "nemo-toolkit" in install and "megatron-core" in install
    # DALI is not on that machine: the locked one, with what it needs
    assert "nvidia-dali-cuda130" in install
    # what only torch needs (its CUDA libraries, sympy) comes with the machine's torch
    assert not {n for n in install if n.startswith("nvidia-cu") or n in ("sympy", "triton", "torch", "numpy")}
    assert "sympy" in todo.covered and any(n.startswith("nvidia-cublas") for n in todo.covered)
    # pip, setuptools and wheel are asked for by the lock itself: never "covered" by torch
    assert {"pip", "setuptools", "wheel"} <= install.keys()
    # a package at exactly the locked version is used as it is
    same = envlock.plan(lock, envlock.read_freeze(GPU_MACHINE + f"pydantic=={lock['pydantic'].version}\n"))
    assert "pydantic" in same.same and "pydantic" not in {e.name for e in same.install}
    # an NGC base ships DALI under another CUDA's name: the family is kept, not installed twice
    ngc = envlock.plan(lock, envlock.read_freeze(GPU_MACHINE + "nvidia-dali-cuda120==1.53.0\n"))
    assert ngc.kept["nvidia-dali-cuda130"] == "1.53.0 as nvidia-dali-cuda120"
    assert not {e.name for e in ngc.install if e.name.startswith("nvidia-dali")}
    # no freeze: a machine with torch, triton and numpy only
    bare = envlock.plan(lock, {n: "?" for n in envlock.ASSUMED_BASE})
    assert set(bare.kept) == {"torch", "triton", "numpy"}
    assert {"lightning", "pydantic", "huggingface-hub"} <= {e.name for e in bare.install}


def test_freeze_lines():
    assert envlock.read_freeze("Foo_Bar==1.0\n# comment\n\nbaz @ file:///x\n-e git+https://x#egg=q\n") == {
        "foo-bar": "1.0", "baz": "?"}
    with pytest.raises(envlock.LockError, match="expected name==version"):
        envlock.read_freeze("this is not a freeze line\n")


def test_large_wheels_travel_in_parts_and_are_reassembled(tmp_path):
    """`make wheels` folders: at most the limit each, a wheel over it in parts (DALI is 189 MiB; one
    device call carries 64 MiB), reassembled and checked by `make setup WHEELS=`."""
    src = tmp_path / "src"
    src.mkdir()
    blobs = {"big-1.0-py3-none-any.whl": 2500, "mid-2.0-py3-none-any.whl": 900, "small-3.0-py3-none-any.whl": 80}
    for name, size in blobs.items():
        (src / name).write_bytes(bytes((i * 7 + len(name)) % 251 for i in range(size)))
    dest = tmp_path / "wheels"
    folders = envlock.pack(sorted(src.iterdir()), dest, limit=1000, built={"small-3.0-py3-none-any.whl"})
    for folder in folders:
        assert sum(p.stat().st_size for p in folder.iterdir() if p.name != envlock.MANIFEST) <= 1000
    names = sorted(p.name for f in folders for p in f.iterdir() if p.name != envlock.MANIFEST)
    assert names == ["big-1.0-py3-none-any.whl.part-1-of-3", "big-1.0-py3-none-any.whl.part-2-of-3",
                     "big-1.0-py3-none-any.whl.part-3-of-3", "mid-2.0-py3-none-any.whl", "small-3.0-py3-none-any.whl"]
    work = tmp_path / "work"
    work.mkdir()
    found = envlock.collect_wheels(dest, work)
    assert sorted(found) == ["big", "mid", "small"]
    for name, (path, row) in found.items():
        original = next(src.glob(f"{name}-*.whl"))
        assert path.read_bytes() == original.read_bytes()
        assert row["wheel_sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
    assert found["small"][1]["built_from_sdist"] and not found["big"][1]["built_from_sdist"]
    # a damaged part is caught by the reassembled wheel's sha256, a missing one by its count
    part = next(dest.rglob("big-1.0-py3-none-any.whl.part-2-of-3"))
    data = bytearray(part.read_bytes())
    data[10] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(envlock.LockError, match="a part is damaged"):
        envlock.collect_wheels(dest, work)
    part.unlink()
    with pytest.raises(envlock.LockError, match="parts 1, 3 of 3"):
        envlock.collect_wheels(dest, work)


def test_subset_is_a_package_and_what_it_needs():
    lock = envlock.read_lock()
    torch_stack = {e.name for e in envlock.subset(lock, ["torch"])}
    assert {"torch", "triton", "sympy", "filelock"} <= torch_stack and "megatron-core" not in torch_stack
    with pytest.raises(envlock.LockError, match="not in the lock"):
        envlock.subset(lock, ["no-such-package"])


def test_only_the_named_families_are_kept():
    """torch-geometric is not torch (the GPU machine has both); nvidia-dali-* and transformer-engine-* are
    families."""
    lock = envlock.read_lock()
    todo = envlock.plan(lock, envlock.read_freeze(GPU_MACHINE + "torch-geometric==2.8.0.post1\n"))
    assert todo.kept["torch"] == "2.11.0+cu130"
