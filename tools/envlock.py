#!/usr/bin/env python3
"""The locked environment (requirements.lock): what a machine needs of it, fetching it, installing it
and checking a venv against it. Standard library only: it runs before any venv exists.

    python tools/envlock.py check   --python .venv/bin/python
        the venv holds exactly the locked versions (a venv with --system-site-packages: its own packages
        are locked versions, and every locked package it imports is the locked version, except the
        base's torch & co)
    python tools/envlock.py plan    [--freeze FILE]
        the locked packages a machine with this `pip list --format=freeze` must install (default: a
        machine that ships torch & co only), and what it keeps of its own
    python tools/envlock.py fetch   --dest DIR [--freeze FILE] [--batch-mib 60]
        download those wheels (hash-checked; sdist-only packages built into wheels) into DIR/batch-<k>/
        folders of at most --batch-mib each; a larger wheel (DALI) is split into parts there
    python tools/envlock.py install --python .venv/bin/python [--wheels DIR]
        install the plan for that venv's interpreter (its base's packages as the freeze) from DIR
        (offline: parts reassembled and checked) or from the index, every file hash-checked
    python tools/envlock.py subset  PACKAGE [...]
        the lock's lines of PACKAGE and everything it needs (e.g. torch for a stand-in base image)
    pip list --format=freeze | python tools/envlock.py keep
        the freeze's torch & co lines (the Dockerfile's constraints file for later installs)

"torch & co" (KEEP below) are the packages a GPU machine or an NGC container ships built against its
CUDA: a machine that has one keeps its own version, whatever the lock says, and the locked packages
that only they need (the CUDA libraries, sympy, ...) are not installed beside them. Every other
package is the locked version: a package the machine has at another version (the GPU machine's
lightning 2.6.6 where the lock has NeMo's 2.4.0) is installed into the venv, where it shadows the
base's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = "cosmos-recipes"
# Kept from a machine that has them (any version): torch and the packages built against the same CUDA.
# A family (nvidia-dali-cuda120 / -cuda130, transformer-engine-cu12 ...) counts as one: a base with any member keeps it.
KEEP = re.compile(r"^(?:(torch|torchvision|torchaudio|triton|pytorch-triton|numpy|apex)|"
                  r"(nvidia-dali|transformer-engine|flash-attn)(?:-[a-z0-9]+)*)$")
# A machine that ships torch & co, when no freeze is given: what `make wheels` assumes it has.
ASSUMED_BASE = ("torch", "triton", "numpy")
# pip download of binary wheels for the machines we target: CPython 3.12 on x86-64 Linux.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")
PART_SUFFIX = re.compile(r"^(?P<wheel>.+\.whl)\.part-(?P<index>\d+)-of-(?P<count>\d+)$")
MANIFEST = "manifest.json"


class LockError(Exception):
    """A one-line problem with the lock, a freeze, a wheel folder or a venv."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Locked:
    name: str
    version: str
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)  # canonical names of the locked packages that need it
    direct: bool = False  # asked for by pyproject.toml or the lock's own input (pip, setuptools, wheel)

    def requirement(self) -> str:
        hashes = "".join(f" \\\n    --hash=sha256:{h}" for h in self.hashes)
        return f"{self.name}=={self.version}{hashes}"


def read_lock(path: Path = LOCK) -> dict[str, Locked]:
    """Parse a `uv pip compile --generate-hashes` output: pins, their hashes and `# via` annotations
    (names of other locked packages; the project itself and input files are not packages)."""
    if not path.is_file():
        raise LockError(f"{path} does not exist: run `make lock`")
    entries: dict[str, Locked] = {}
    current: Locked | None = None
    in_via = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s\\;]+)", raw)
        if pin:
            current = Locked(canonical(pin.group(1)), pin.group(3))
            entries[current.name] = current
            in_via = False
            continue
        if current is None:
            continue
        if line.startswith("--hash=sha256:"):
            current.hashes.append(line.split(":", 1)[1].rstrip(" \\"))
        elif line.startswith("# via"):
            rest = line[len("# via"):].strip()
            in_via = not rest
            if rest:
                current.via.add(rest)
        elif in_via and line.startswith("#   "):
            current.via.add(line[4:].strip())
        else:
            in_via = False
    for entry in entries.values():  # "cosmos-recipes (pyproject.toml)" and "-" (the input on stdin) are no packages
        entry.direct = any(canonical(v) not in entries for v in entry.via)
        entry.via = {canonical(v) for v in entry.via if canonical(v) in entries}
    if not entries:
        raise LockError(f"{path} pins no package: run `make lock`")
    return entries


def read_freeze(text: str) -> dict[str, str]:
    """`pip list --format=freeze` / `pip freeze` lines -> {canonical name: version}; editable and
    direct-URL lines (`name @ file://...`) count as installed at an unknown version."""
    installed: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+)|@\s*\S+)", line)
        if not m:
            raise LockError(f"freeze line {line!r}: expected name==version (pip list --format=freeze)")
        installed[canonical(m.group(1))] = m.group(2) or "?"
    return installed


@dataclass
class Plan:
    install: list[Locked]           # locked packages to install into the venv
    same: list[str]                 # the machine has the locked version already
    kept: dict[str, str]            # torch & co of the machine's own (name -> its version)
    covered: list[str]              # locked only because torch & co need them: the machine's stack brings its own

    def describe(self) -> str:
        kept = ", ".join(f"{n} {v}" for n, v in sorted(self.kept.items())) or "nothing"
        return (f"install {len(self.install)} locked packages; {len(self.same)} already at the locked version; "
                f"kept from the machine: {kept}; {len(self.covered)} locked only for those (not installed)")


def plan(lock: dict[str, Locked], installed: dict[str, str]) -> Plan:
    """What a machine with ``installed`` needs of the lock (see the module docstring)."""
    def family(name: str) -> str | None:
        m = KEEP.match(name)
        return (m.group(1) or m.group(2)) if m else None

    base_families = {family(n): n for n in installed if family(n)}
    kept = {}  # locked name -> the base's version (and its own name where another member of the family)
    for name in lock:
        own = base_families.get(family(name))
        if own:
            kept[name] = installed[own] if own == name else f"{installed[own]} as {own}"
    covered: set[str] = set()
    changed = True
    while changed:  # locked packages needed only by kept ones (or by those), transitively
        changed = False
        for name, entry in lock.items():
            if name in kept or name in covered or entry.direct or not entry.via:
                continue
            if entry.via <= (kept.keys() | covered):
                covered.add(name)
                changed = True
    install, same = [], []
    for name, entry in sorted(lock.items()):
        if name in kept or name in covered:
            continue
        if installed.get(name) == entry.version:
            same.append(name)
        else:
            install.append(entry)
    return Plan(install=install, same=same, kept=kept, covered=sorted(covered))


LIST_PACKAGES = """
import importlib.metadata as m, json, site, sys
where = sys.argv[1]
if where == "own":  # the venv's own site-packages
    paths = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
elif where == "base":  # what it sees of its base interpreter (and a parent venv: _parent_site.pth)
    paths = [p for p in sys.path if p and not p.startswith(sys.prefix)]
else:  # everything it imports, the first distribution of each name winning as at import
    paths = sys.path
seen = {}
for d in m.distributions(path=paths):
    if d.metadata["Name"]:
        seen.setdefault(d.metadata["Name"], d.version)
print(json.dumps(seen))
"""


def interpreter_packages(python: str, where: str = "all") -> dict[str, str]:
    """{canonical name: version} of the distributions ``python`` sees: ``all`` it imports, its venv's
    ``own`` site-packages, or its ``base``'s (the machine's freeze under a --system-site-packages venv)."""
    out = subprocess.run([python, "-c", LIST_PACKAGES, where], capture_output=True, text=True)
    if out.returncode != 0:
        raise LockError(f"{python} could not list its packages: {out.stderr.strip().splitlines()[-1:]}")
    return {canonical(k): v for k, v in json.loads(out.stdout).items()}


def system_site(python: str) -> bool:
    """Whether ``python``'s venv was made with --system-site-packages."""
    cfg = Path(subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                              check=True).stdout.strip()) / "pyvenv.cfg"
    if not cfg.is_file():
        raise LockError(f"{python} is not in a venv (no {cfg})")
    return bool(re.search(r"^include-system-site-packages\s*=\s*true", cfg.read_text(), re.M | re.I))


REQUIREMENTS_MET = """
import importlib.metadata as m, json
from packaging.requirements import Requirement
problems = []
for line in m.requires("%s") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        version = m.version(req.name)
    except m.PackageNotFoundError:
        problems.append(f"{req.name} is not installed ({req})")
        continue
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name} {version} does not satisfy pyproject.toml's {req}")
print(json.dumps(problems))
""" % PROJECT


def check(python: str, lock: dict[str, Locked]) -> list[str]:
    """Differences between ``python``'s venv and the lock (empty: it matches), and pyproject.toml's
    requirements that what the venv imports does not meet (a base's torch 2.11.0a0 for torch>=2.11)."""
    out = subprocess.run([python, "-c", REQUIREMENTS_MET], capture_output=True, text=True)
    if out.returncode != 0:
        raise LockError(f"{python} could not check {PROJECT}'s requirements (is it installed?): "
                        f"{out.stderr.strip().splitlines()[-1:]}")
    problems = json.loads(out.stdout)
    own = interpreter_packages(python, "own")
    own.pop(PROJECT, None)
    if not system_site(python):
        for name, entry in sorted(lock.items()):
            if name not in own:
                problems.append(f"{name}=={entry.version} is locked but not installed")
            elif own[name] != entry.version:
                problems.append(f"{name} is {own[name]}, the lock has {entry.version}")
        problems += [f"{n}=={v} is installed but not in the lock" for n, v in sorted(own.items()) if n not in lock]
        return problems
    # --system-site-packages: the venv's own packages are locked versions, and what it imports is the plan's
    for name, version in sorted(own.items()):
        if name not in lock:
            problems.append(f"{name}=={version} is in the venv but not in the lock")
        elif version != lock[name].version:
            problems.append(f"{name} is {version} in the venv, the lock has {lock[name].version}")
    expected = plan(lock, interpreter_packages(python, "base"))
    for name in sorted(own.keys() & (expected.kept.keys() | set(expected.covered))):
        problems.append(f"{name} {own[name]} is in the venv, where it shadows the base's torch & co")
    seen = interpreter_packages(python)
    for entry in expected.install:
        if seen.get(entry.name) != entry.version:
            problems.append(f"{entry.name} imports as {seen.get(entry.name, 'missing')}, the lock has {entry.version}")
    return problems


# ------------------------------------------------------------------ fetching and installing wheels
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _requirements_file(entries: list[Locked], directory: Path) -> Path:
    path = directory / "requirements.txt"
    path.write_text("".join(e.requirement() + "\n" for e in entries))
    return path


def _wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-len(".whl")].split("-")
    return canonical(parts[0]), parts[1]


def fetch(lock: dict[str, Locked], installed: dict[str, str], dest: Path, batch_mib: float, pip: list[str]) -> list[Path]:
    """Download the plan's wheels into ``dest/batch-<k>/`` (each folder at most ``batch_mib``), split a
    wheel larger than that into parts, and write each folder's manifest. Returns the folders."""
    todo = plan(lock, installed)
    limit = int(batch_mib * (1 << 20))
    with tempfile.TemporaryDirectory(prefix="envlock-") as tmp:
        tmp = Path(tmp)
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        base = [*pip, "download", "--no-deps", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                "--abi", "abi3", "--abi", "none", *platform_args, "-d", str(tmp / "wheels")]

        def download(entries: list[Locked]) -> subprocess.CompletedProcess:
            return subprocess.run([*base, "--only-binary=:all:", "--require-hashes", "-r",
                                   str(_requirements_file(entries, tmp))], capture_output=True, text=True)

        # one pip call for everything; when some package has no wheel, each is tried alone to find which
        source = []
        if download(todo.install).returncode != 0:
            for entry in todo.install:
                probe = download([entry])
                if probe.returncode == 0:
                    continue
                if "No matching distribution" not in probe.stderr + probe.stdout:
                    raise LockError(f"pip download {entry.name}=={entry.version} failed: "
                                    f"{(probe.stderr or probe.stdout).strip().splitlines()[-1]}")
                source.append(entry)
        built: set[str] = set()
        for entry in source:  # sdist only (e.g. antlr4-python3-runtime): the hash-checked sdist built into a wheel
            req = _requirements_file([entry], tmp)
            out = subprocess.run([*pip, "wheel", "--no-deps", "--require-hashes", "-r", str(req), "-w",
                                  str(tmp / "wheels")], capture_output=True, text=True)
            if out.returncode != 0:
                raise LockError(f"{entry.name}=={entry.version} has no wheel for CPython 3.12 x86-64 and its sdist did "
                                f"not build: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
            wheel = next(p for p in (tmp / "wheels").glob("*.whl") if _wheel_name_version(p.name)[0] == entry.name)
            built.add(wheel.name)
        files = list((tmp / "wheels").glob("*.whl"))
        found = {_wheel_name_version(p.name)[0] for p in files}
        missing = [e.name for e in todo.install if e.name not in found]
        if missing:
            raise LockError(f"no wheel was downloaded for {', '.join(missing)}")
        return pack(files, dest, limit, built=built)


def pack(files: list[Path], dest: Path, limit: int, built: set[str] = frozenset()) -> list[Path]:
    """Copy ``files`` into ``dest/batch-<k>/`` folders of at most ``limit`` bytes (first fit, largest
    first), a file larger than that split into ``<name>.part-<i>-of-<n>`` pieces; each folder's manifest
    records every wheel's sha256 (``built``: names of wheels built from sdists). Returns the folders."""
    pieces: list[tuple[str, Path, int, int, int]] = []  # (name in folder, source, offset, size, total)
    for wheel in sorted(files, key=lambda p: -p.stat().st_size):
        size = wheel.stat().st_size
        count = max(1, -(-size // limit))
        for i in range(count):
            name = wheel.name if count == 1 else f"{wheel.name}.part-{i + 1}-of-{count}"
            pieces.append((name, wheel, i * limit, min(limit, size - i * limit), size))
    batches: list[list[tuple]] = []
    for piece in sorted(pieces, key=lambda p: -p[3]):
        for batch in batches:
            if sum(p[3] for p in batch) + piece[3] <= limit:
                batch.append(piece)
                break
        else:
            batches.append([piece])
    for old in dest.glob("batch-*"):
        shutil.rmtree(old)
    digests = {f: sha256(f) for f in files}
    folders = []
    for k, batch in enumerate(batches, 1):
        folder = dest / f"batch-{k}"
        folder.mkdir(parents=True)
        manifest = {}
        for name, src, offset, size, total in batch:
            with open(src, "rb") as fin, open(folder / name, "wb") as fout:
                fin.seek(offset)
                fout.write(fin.read(size))
            manifest[name] = {"wheel": src.name, "wheel_sha256": digests[src], "wheel_bytes": total,
                              "built_from_sdist": src.name in built}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        folders.append(folder)
    return folders


def collect_wheels(folder: Path, work: Path) -> dict[str, tuple[Path, dict]]:
    """{canonical name: (wheel path, manifest row)} from a `fetch` folder (all batch-* folders below it, or
    a plain folder of wheels), parts reassembled into ``work`` and checked against their manifest."""
    rows: dict[str, tuple[Path, dict]] = {}
    parts: dict[str, list[Path]] = {}
    manifests = sorted(folder.rglob(MANIFEST))
    listed = {}
    for manifest in manifests:
        for name, row in json.loads(manifest.read_text()).items():
            listed[str(manifest.parent / name)] = row
    for path in sorted(folder.rglob("*")):
        m = PART_SUFFIX.match(path.name)
        if m:
            parts.setdefault(m.group("wheel"), []).append(path)
        elif path.name.endswith(".whl"):
            rows[_wheel_name_version(path.name)[0]] = (path, listed.get(str(path), {}))
    for wheel, pieces in parts.items():
        count = int(PART_SUFFIX.match(pieces[0].name).group("count"))
        indices = sorted(int(PART_SUFFIX.match(p.name).group("index")) for p in pieces)
        if indices != list(range(1, count + 1)):
            have = ", ".join(str(i) for i in indices)
            raise LockError(f"{wheel}: parts {have} of {count} are in {folder}; carry every batch folder")
        pieces.sort(key=lambda p: int(PART_SUFFIX.match(p.name).group("index")))
        row = listed.get(str(pieces[0]), {})
        target = work / wheel
        with open(target, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out)
        if row.get("wheel_sha256") and sha256(target) != row["wheel_sha256"]:
            raise LockError(f"{wheel}: the reassembled wheel's sha256 differs from its manifest (a part is damaged)")
        rows[_wheel_name_version(wheel)[0]] = (target, row)
    return rows


def install(python: str, lock: dict[str, Locked], wheels: Path | None, pip: list[str] | None = None) -> Plan:
    """Install the lock's plan for ``python``'s venv, whose base packages are the machine's freeze."""
    base = interpreter_packages(python, "base") if system_site(python) else {}
    todo = plan(lock, base)
    pip = pip or [python, "-m", "pip"]
    print(f"envlock: {todo.describe()}", flush=True)
    if not todo.install:
        return todo
    with tempfile.TemporaryDirectory(prefix="envlock-") as tmp:
        tmp = Path(tmp)
        entries = list(todo.install)
        args = [*pip, "install", "--no-deps", "--require-hashes", "--no-compile"]
        if wheels is not None:
            if not wheels.is_dir():
                raise LockError(f"WHEELS={wheels} is not a directory")
            available = collect_wheels(wheels, tmp)
            missing = [f"{e.name}=={e.version}" for e in entries if e.name not in available]
            wrong = [f"{e.name} (folder {_wheel_name_version(available[e.name][0].name)[1]}, lock {e.version})"
                     for e in entries if e.name in available
                     and _wheel_name_version(available[e.name][0].name)[1] != e.version]
            if missing or wrong:
                raise LockError(
                    f"WHEELS={wheels} lacks what this machine needs of the lock: "
                    + "; ".join(filter(None, [", ".join(missing) and "missing " + ", ".join(missing),
                                              ", ".join(wrong) and "other versions " + ", ".join(wrong)]))
                    + ". Make the folder where pip has an index: `pip list --format=freeze > freeze.txt` here, then "
                    "`make wheels WHEELS=<dir> FREEZE=freeze.txt` there")
            links = tmp / "links"
            links.mkdir()
            checked = []
            for e in entries:
                path, row = available[e.name]
                if row.get("built_from_sdist"):  # a wheel `fetch` built from the locked (hash-checked) sdist
                    e = Locked(e.name, e.version, [row["wheel_sha256"]])
                elif sha256(path) not in e.hashes:
                    raise LockError(f"{path.name}: its sha256 is none of the lock's hashes for {e.name}=={e.version}")
                checked.append(e)
                os.symlink(path.resolve(), links / path.name)
            entries = checked
            args += ["--no-index", "--find-links", str(links)]
        args += ["-r", str(_requirements_file(entries, tmp))]
        subprocess.run(args, check=True)
    return todo


def subset(lock: dict[str, Locked], roots: list[str]) -> list[Locked]:
    """``roots`` and every locked package they need, transitively (from the `# via` annotations)."""
    wanted = {canonical(r) for r in roots}
    unknown = wanted - lock.keys()
    if unknown:
        raise LockError(f"not in the lock: {', '.join(sorted(unknown))}")
    changed = True
    while changed:
        changed = False
        for name, entry in lock.items():
            if name not in wanted and entry.via & wanted:
                wanted.add(name)
                changed = True
    return [lock[n] for n in sorted(wanted)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/envlock.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file (default requirements.lock)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare a venv with the lock")
    p.add_argument("--python", required=True)
    for name in ("plan", "fetch"):
        p = sub.add_parser(name, help="what a machine needs" if name == "plan" else "download it as wheel folders")
        p.add_argument("--freeze", type=Path, default=None,
                       help="the machine's `pip list --format=freeze` (default: a machine with torch & co only)")
        if name == "fetch":
            p.add_argument("--dest", type=Path, required=True)
            p.add_argument("--batch-mib", type=float, default=60.0,
                           help="the most one folder holds (a GPU call carries 64 MiB with the working tree)")
    p = sub.add_parser("install", help="install the lock into a venv (offline from --wheels, or from the index)")
    p.add_argument("--python", required=True)
    p.add_argument("--wheels", type=Path, default=None)
    p = sub.add_parser("subset", help="the lock lines of packages and what they need")
    p.add_argument("packages", nargs="+")
    sub.add_parser("keep", help="the torch & co lines of a `pip list --format=freeze` on stdin (a constraints file)")
    args = parser.parse_args(argv)
    try:
        if args.command == "keep":  # no lock needed: the Dockerfile pins the base's torch & co with it
            for line in sys.stdin.read().splitlines():
                name = next(iter(read_freeze(line)), None)
                if name and KEEP.match(name):
                    print(line.strip())
            return 0
        lock = read_lock(args.lock)
        if args.command == "check":
            problems = check(args.python, lock)
            for line in problems:
                print(f"envlock: {line}", file=sys.stderr)
            if problems:
                print(f"envlock: the venv of {args.python} differs from {args.lock.name} ({len(problems)} packages): "
                      "rebuild it with `make clean-venv setup`", file=sys.stderr)
                return 1
            print(f"envlock: {args.python} matches {args.lock.name}")
        elif args.command in ("plan", "fetch"):
            installed = (read_freeze(args.freeze.read_text()) if args.freeze
                         else {n: "?" for n in ASSUMED_BASE})
            if args.command == "plan":
                todo = plan(lock, installed)
                print(todo.describe())
                for e in todo.install:
                    print(f"  {e.name}=={e.version}")
            else:
                folders = fetch(lock, installed, args.dest, args.batch_mib, [sys.executable, "-m", "pip"])
                for folder in folders:
                    size = sum(p.stat().st_size for p in folder.iterdir()) / (1 << 20)
                    print(f"{folder}: {len(list(folder.glob('*'))) - 1} files, {size:.1f} MiB")
                print(f"then, offline: make setup WHEELS={args.dest} (with every batch folder of {args.dest} there)")
        elif args.command == "install":
            install(args.python, lock, args.wheels)
        else:
            for e in subset(lock, args.packages):
                print(e.requirement())
    except LockError as exc:
        print(f"envlock: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
