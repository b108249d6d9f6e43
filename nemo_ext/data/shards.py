"""webdataset tar shards: writing (with DALI index files and a manifest) and random-access reading.

Conventions (DESIGN.md section 6): a sample is the run of consecutive tar members
``<key>.<ext>`` with the same key; keys have no dots, and the extension is everything after the
first dot of the file name (``k.nframes.npy`` -> ``nframes.npy``), which is how both webdataset
and DALI's ``fn.readers.webdataset`` split names. Shards are ``<prefix>-%06d.tar`` with a DALI
index ``<prefix>-%06d.idx`` next to each (the format DALI's ``wds2idx`` writes, version 1.2):

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member_name> [<ext> <data_offset> <size> <member_name> ...]

one line per sample, offsets pointing at the member's data (after its 512-byte header).
The same index gives the CPU loader O(1) random access (:class:`ShardIndex`).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand

logger = logging.getLogger(__name__)

__all__ = [
    "ShardError",
    "expand_paths",
    "ShardInfo",
    "ShardWriter",
    "SampleRef",
    "ShardIndex",
    "encode_member",
    "index_tar",
    "read_idx",
    "write_idx",
    "write_manifest",
    "read_manifest",
    "MANIFEST_NAME",
    "IDX_VERSION",
]

IDX_VERSION = "v1.2"
MANIFEST_NAME = "manifest.json"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to whole 10 KiB records
_TAR_MTIME = 0  # fixed so that the same samples always give byte-identical shards
_KEY_RE = re.compile(r"^[^.]+$")


class ShardError(ValueError):
    """A shard set cannot be used as asked: missing files, unreadable tars, incomplete samples."""


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard: its final path, sample count, size in bytes and content hash."""

    path: Path
    num_samples: int
    num_bytes: int
    sha256: str


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def encode_member(value: Any, ext: str) -> bytes:
    """Serialize one sample field: bytes as-is, str as UTF-8, dict/list as JSON, arrays via np.save.

    JSON is written with sorted keys so equal content gives equal bytes.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"cannot encode field {ext!r} of type {type(value).__name__}: expected bytes, "
                    "str, dict/list (json) or numpy array (npy)")


def _tar_size(num_bytes: int) -> int:
    """Bytes one ustar member takes: its header block plus its data padded to whole blocks."""
    return _TAR_BLOCK + -(-num_bytes // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_size(member_bytes: int) -> int:
    """On-disk size of a tar holding ``member_bytes`` of members: + end blocks, record padding."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Write samples into ``<out_dir>/<prefix>-%06d.tar`` shards, each with a DALI ``.idx`` file.

    A new shard starts when adding the next sample would make the shard exceed ``max_count``
    samples or a file size of ``max_bytes`` (tar headers, end blocks and the 10 KiB record
    padding included, so ``ShardInfo.num_bytes <= max_bytes`` holds unless a single sample is
    larger than that, which then gets a shard of its own).
    Each shard is written as ``.tar.partial`` and renamed only once complete, so a killed writer
    never leaves a truncated ``.tar`` that looks finished. The index is written after the rename
    (a tar without ``.idx`` is still readable: :class:`ShardIndex` then scans it).

    Use as a context manager; :attr:`shards` lists the :class:`ShardInfo` of finished shards.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_count: int = 1000,
                 max_bytes: int = 1 << 30, start_index: int = 0) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"max_count and max_bytes must be >= 1, got {max_count}, {max_bytes}")
        if not prefix or "." in prefix or "/" in prefix:
            raise ValueError(f"shard prefix must be a non-empty name without '.' or '/', got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._next_index = start_index
        self._tar: Any = None  # webdataset.TarWriter of the open shard
        self._partial: Path | None = None
        self._count = 0
        self._bytes = 0
        self._keys_in_shard: set[str] = set()

    # context manager -------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard behind that a later run could mistake for data
            self._abort()

    # public ----------------------------------------------------------------------------------
    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample: ``{"__key__": key, ext: bytes | str | dict | np.ndarray, ...}``."""
        key, members = self._encode(sample)
        size = sum(_tar_size(len(v)) for v in members.values())
        if self._tar is not None and (self._count + 1 > self.max_count
                                      or _tar_file_size(self._bytes + size) > self.max_bytes):
            self._finish()
        if self._tar is None:
            self._start()
        if key in self._keys_in_shard:
            raise ValueError(f"duplicate sample key {key!r} in shard {self._partial}")
        self._keys_in_shard.add(key)
        assert self._tar is not None
        self._tar.write({"__key__": key, **members})
        self._count += 1
        self._bytes += size

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any) and return all finished shards."""
        if self._tar is not None:
            self._finish()
        return self.shards

    # internals -------------------------------------------------------------------------------
    @staticmethod
    def _encode(sample: Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
        key = sample.get("__key__")
        if not isinstance(key, str) or not _KEY_RE.match(key) or key.startswith("/"):
            raise ValueError(f"sample __key__ must be a non-empty string without dots, got {key!r}")
        members = {ext: encode_member(v, ext) for ext, v in sample.items() if not ext.startswith("_")}
        if not members:
            raise ValueError(f"sample {key!r} has no fields to write")
        for ext in members:
            if not ext or ext.startswith(".") or "/" in ext:
                raise ValueError(f"sample {key!r}: bad extension {ext!r}")
        return key, members

    def _start(self) -> None:
        import webdataset as wds  # imported here: it pulls in torch, which readers do not need

        self.out_dir.mkdir(parents=True, exist_ok=True)
        final = self.out_dir / f"{self.prefix}-{self._next_index:06d}.tar"
        self._partial = final.with_name(final.name + ".partial")
        self._tar = wds.TarWriter(str(self._partial), encoder=False, mtime=_TAR_MTIME,
                                  user="", group="", mode=0o444)
        self._count, self._bytes, self._keys_in_shard = 0, 0, set()

    def _finish(self) -> None:
        assert self._tar is not None and self._partial is not None
        self._tar.close()
        final = self._partial.with_name(self._partial.name[: -len(".partial")])
        os.replace(self._partial, final)
        write_idx(final, index_tar(final))
        info = ShardInfo(path=final, num_samples=self._count, num_bytes=final.stat().st_size,
                         sha256=_sha256(final))
        self.shards.append(info)
        logger.debug("wrote shard %s (%d samples, %d bytes)", final, info.num_samples, info.num_bytes)
        self._tar, self._partial = None, None
        self._next_index += 1

    def _abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                if self._partial is not None:
                    self._partial.unlink(missing_ok=True)
                self._tar, self._partial = None, None


# --------------------------------------------------------------------------------------------
# DALI index files
# --------------------------------------------------------------------------------------------

# one sample: list of (ext, data_offset, size, member_name), in tar order
Sample = list[tuple[str, int, int, str]]


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): the first dot of the base name splits."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def index_tar(path: str | os.PathLike) -> list[Sample]:
    """Scan a tar's headers (data is skipped, not read) into samples, the way ``wds2idx`` does."""
    path = Path(path)
    samples: list[Sample] = []
    last_key: str | None = None
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                key, ext = _split_name(member.name)
                if not key or key.endswith("/") or not ext:  # hidden files, names without ext
                    continue
                entry = (ext, member.offset_data, member.size, member.name)
                if key != last_key:
                    samples.append([entry])
                    last_key = key
                else:
                    samples[-1].append(entry)
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"cannot read shard {path}: {e}") from e
    return samples


def write_idx(tar_path: str | os.PathLike, samples: Sequence[Sample],
              idx_path: str | os.PathLike | None = None) -> Path:
    """Write a DALI v1.2 index for ``tar_path`` (default: same stem, ``.idx``), atomically."""
    idx = Path(idx_path) if idx_path is not None else Path(tar_path).with_suffix(".idx")
    lines = [f"{IDX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in s) for s in samples]
    tmp = idx.with_name(idx.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, idx)
    return idx


def read_idx(idx_path: str | os.PathLike) -> list[Sample]:
    """Parse a DALI index file (v1.1 and v1.2 lines both carry ext/offset/size/name quadruples)."""
    idx_path = Path(idx_path)
    try:
        lines = idx_path.read_text().splitlines()
    except OSError as e:
        raise ShardError(f"cannot read index file {idx_path}: {e}") from e
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2") or not header[1].isdigit():
        raise ShardError(f"index file {idx_path}: expected a first line 'v1.2 <num_samples>', "
                         f"got {lines[0] if lines else '(empty file)'!r}")
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != int(header[1]):
        raise ShardError(f"index file {idx_path} declares {header[1]} samples but lists {len(body)}")
    samples: list[Sample] = []
    for lineno, line in enumerate(body, start=2):
        tok = line.split(" ")
        if len(tok) % 4 or not tok:
            raise ShardError(f"index file {idx_path} line {lineno}: expected groups of "
                             f"'<ext> <offset> <size> <name>', got {line!r}")
        try:
            samples.append([(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3])
                            for i in range(0, len(tok), 4)])
        except ValueError as e:
            raise ShardError(f"index file {idx_path} line {lineno}: {e}") from e
    return samples


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Where one sample's members live: ``members[ext] = (data_offset, size)`` in ``shard``."""

    key: str
    shard: Path
    members: dict[str, tuple[int, int]] = field(hash=False)


_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_paths(spec: str | os.PathLike) -> list[Path]:
    """One spec -> shard paths: a directory (its ``*.tar``), a glob/brace pattern, or a file."""
    spec = os.fspath(spec)
    out: list[Path] = []
    for item in braceexpand(spec):
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.tar"))
            if not found:
                raise ShardError(f"no shards: directory {p} (from {spec!r}) has no *.tar files")
            out += found
        elif _GLOB_CHARS.search(item):
            found = sorted(Path(m) for m in glob.glob(item) if m.endswith(".tar"))
            if not found:
                raise ShardError(f"no shards match the pattern {item!r} (from {spec!r})")
            out += found
        else:
            if not p.is_file():
                raise ShardError(f"shard {p} does not exist (from {spec!r})")
            out.append(p)
    return out


def check_data_paths(data_cfg) -> None:
    """Every shard set a run's ``data`` config names (``data.path`` or each of ``data.sources``, and
    ``data.val_path``) exists and holds shards, checked before any work: one ShardError naming the key.
    The generated sample world (no path given) is not checked: it is made when missing."""
    specs = [(f"data.sources[{s.name}].path", s.path) for s in (data_cfg.sources or [])]
    if not specs and data_cfg.path:
        specs.append(("data.path", data_cfg.path))
    if data_cfg.val_path:
        specs.append(("data.val_path", data_cfg.val_path))
    for key, spec in specs:
        try:
            expand_paths(spec)
        except ShardError as exc:
            raise ShardError(f"{key}={spec}: {exc}") from None


class ShardIndex:
    """An ordered, random-access list of samples over a set of shards.

    Built from DALI ``.idx`` files when present (no tar scan), else from the tar headers. Reads
    use ``os.pread`` on per-process file descriptors opened lazily: a DataLoader worker forked
    from a process that already read gets its own descriptors (the pid is checked on each read),
    and pickling (spawned workers) drops them.
    """

    def __init__(self, samples: Sequence[SampleRef], shards: Sequence[Path]) -> None:
        self.samples: list[SampleRef] = list(samples)
        self.shards: list[Path] = list(shards)
        self._fds: dict[Path, int] = {}
        self._pid = os.getpid()

    @classmethod
    def from_paths(cls, paths: str | os.PathLike | Iterable[str | os.PathLike],
                   required_exts: Sequence[str] = ()) -> ShardIndex:
        """Index the shards named by ``paths`` (dirs, globs, brace patterns, files), in order.

        Every sample must have every ext in ``required_exts``; the error names the shard, the key
        and what is missing, so a broken shard is found at startup rather than mid-training.
        """
        specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not specs:
            raise ShardError("no shards: the list of shard paths/patterns is empty")
        shard_paths: list[Path] = []
        for spec in specs:
            shard_paths += expand_paths(spec)
        if not shard_paths:
            raise ShardError(f"no shards found for {[os.fspath(s) for s in specs]}")
        samples: list[SampleRef] = []
        for shard in shard_paths:
            samples += _load_shard(shard, tuple(required_exts))
        if not samples:
            raise ShardError(f"the shards {[str(p) for p in shard_paths]} contain no samples")
        return cls(samples, shard_paths)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> SampleRef:
        return self.samples[i]

    def key(self, i: int) -> str:
        return self.samples[i].key

    def has(self, i: int, ext: str) -> bool:
        return ext in self.samples[i].members

    def read(self, i: int, ext: str) -> bytes:
        """The bytes of member ``<key>.<ext>`` of sample ``i``."""
        ref = self.samples[i]
        if ext not in ref.members:
            raise ShardError(f"shard {ref.shard}: sample {ref.key!r} has no {ext!r} member "
                             f"(it has: {', '.join(sorted(ref.members))})")
        offset, size = ref.members[ext]
        data = os.pread(self._fd(ref.shard), size, offset)
        if len(data) != size:
            raise ShardError(f"shard {ref.shard} is truncated: member {ref.key}.{ext} needs bytes "
                             f"{offset}..{offset + size}, file has {ref.shard.stat().st_size}")
        return data

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors share its file offsets
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"cannot open shard {path}: {e}") from e
            self._fds[path] = fd
        return fd

    def __getstate__(self) -> dict[str, Any]:
        return {"samples": self.samples, "shards": self.shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["samples"], state["shards"])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _load_shard(shard: Path, required_exts: tuple[str, ...]) -> list[SampleRef]:
    """Samples of one shard, from its ``.idx`` when there is one, checked for required exts."""
    try:
        tar_size = shard.stat().st_size
    except OSError as e:
        raise ShardError(f"cannot read shard {shard}: {e}") from e
    idx = shard.with_suffix(".idx")
    if idx.is_file():
        raw = read_idx(idx)
        end = max((off + size for s in raw for _, off, size, _ in s), default=0)
        if end > tar_size:
            raise ShardError(f"index file {idx} does not match shard {shard} (points at byte {end}, "
                             f"the tar has {tar_size}); delete the .idx to rescan the tar")
    else:
        raw = index_tar(shard)
    refs = []
    for s in raw:
        key = _split_name(s[0][3])[0]
        members = {ext: (off, size) for ext, off, size, _ in s}
        missing = [e for e in required_exts if e not in members]
        if missing:
            raise ShardError(f"shard {shard}: sample {key!r} is missing {', '.join(missing)} "
                             f"(it has: {', '.join(sorted(members))}; required: "
                             f"{', '.join(required_exts)})")
        refs.append(SampleRef(key=key, shard=shard, members=members))
    return refs


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def write_manifest(out_dir: str | os.PathLike, shard_infos: Sequence[ShardInfo],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/manifest.json``: per-shard counts and hashes, totals and ``extra``.

    Written last and atomically: its presence marks the shard set complete, which is what
    resumable data prep checks. No timestamps, so equal data gives an equal manifest.
    """
    out_dir = Path(out_dir)
    shards = []
    for info in shard_infos:
        try:
            rel = Path(info.path).resolve().relative_to(out_dir.resolve())
        except ValueError as e:
            raise ValueError(f"shard {info.path} is not inside the manifest directory {out_dir}") from e
        shards.append({"path": rel.as_posix(), "num_samples": info.num_samples,
                       "num_bytes": info.num_bytes, "sha256": info.sha256})
    manifest = {
        "version": 1,
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_bytes": sum(s["num_bytes"] for s in shards),
        "shards": shards,
        "extra": dict(extra or {}),
    }
    path = out_dir / MANIFEST_NAME
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Load a manifest from a shard directory (or the ``manifest.json`` path itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ShardError(f"no manifest at {path}") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ShardError(f"manifest {path} has no 'shards' list")
    return manifest
