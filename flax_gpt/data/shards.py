"""The on-disk format (**contract**): `<shards_dir>/manifest.json` + `<split>-NNNNN.npy` shards.

Each shard is a plain `.npy` array of shape (rows, seq_len), dtype uint16 when the vocabulary fits
(< 65536 ids) else uint32, `rows_per_shard` rows except the split's last shard. Files are written
to a temporary name and renamed into place, and the manifest is written last, so a folder with a
manifest always has complete shards (a crash leaves at worst stray `.tmp` files).

`open_split` checks, in this order: manifest present and readable, format version, tokenizer
vocab vs the model's vocab, seq_len vs the config, each shard present with the expected shape and
byte size (and, with verify, sha256). Every failure is a one-line DataError naming the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flax_gpt.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPREPARE = "re-run `flax-gpt prepare` with --overwrite"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npy"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_shard(path: Path, rows: np.ndarray) -> dict:
    """Write one (rows, T) array as .npy atomically; return its manifest entry."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows), allow_pickle=False)
    data = buf.getbuffer()
    write_atomic(path, data)
    return {"file": path.name, "rows": int(rows.shape[0]), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(shards_dir: Path, manifest: dict) -> None:
    write_atomic(shards_dir / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = "" if Path(shards_dir).is_dir() else " (the folder does not exist)"
        raise DataError(f"no {MANIFEST_NAME} in {shards_dir}{hint}; run `flax-gpt prepare CONFIG` first "
                        "or point data.shards_dir at prepared shards")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}); {REPREPARE}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise DataError(f"{path} is not a flax_gpt shard manifest; {REPREPARE}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest['format_version']} but this flax_gpt "
                        f"reads version {FORMAT_VERSION}; {REPREPARE}")
    return manifest


def _npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) read from a .npy header without loading the data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return shape, dtype, f.tell()


def check_shard(shards_dir: Path, entry: dict, seq_len: int, dtype: np.dtype, verify: bool) -> Path:
    path = shards_dir / entry["file"]
    if not path.is_file():
        raise DataError(f"shard {path} is missing; {REPREPARE}")
    try:
        shape, got_dtype, offset = _npy_header(path)
    except Exception:
        raise DataError(f"shard {path} has a corrupt header; {REPREPARE}") from None
    expected = offset + entry["rows"] * seq_len * dtype.itemsize
    size = path.stat().st_size
    if shape != (entry["rows"], seq_len) or got_dtype != dtype or size != expected:
        what = "truncated" if size < expected else "the wrong size/shape"
        raise DataError(f"shard {path} is {what} ({size} bytes, shape {shape} {got_dtype}; expected "
                        f"{expected} bytes, ({entry['rows']}, {seq_len}) {dtype}); {REPREPARE}")
    if verify:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise DataError(f"shard {path} fails its sha256 check (corrupted); {REPREPARE}")
    return path


def check_all_shards(shards_dir: str | os.PathLike, manifest: dict, verify: bool = False) -> None:
    dtype = np.dtype(manifest["dtype"])
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            check_shard(Path(shards_dir), entry, manifest["seq_len"], dtype, verify)


@dataclass
class TokenRows:
    """A split's packed rows, memory-mapped; `rows(indices)` gathers them as int32 (n, T)."""

    shards_dir: Path
    split: str
    manifest: dict
    _arrays: list = field(default_factory=list, repr=False)
    _starts: np.ndarray = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    @property
    def packing(self) -> str:
        return self.manifest["packing"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def rows(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:  # -> int32 (n, T)
        """Rows `indices` (any order, repeats allowed) as int32, into `out` when given.

        Token ids are range-checked on the way out (one max over the batch): an id outside the
        tokenizer's vocabulary means a damaged shard, and the error names it."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((idx.size, self.seq_len), dtype=np.int32)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.num_rows:
            raise IndexError(f"row index out of range [0, {self.num_rows}) in split {self.split!r}")
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            out[sel] = self._arrays[s][idx[sel] - self._starts[s]]
        if out.max(initial=0) >= self.vocab_size:
            bad = int(shard[np.flatnonzero((out >= self.vocab_size).any(axis=1))[0]])
            entry = self.manifest["splits"][self.split]["shards"][bad]
            raise DataError(f"shard {self.shards_dir / entry['file']} holds token ids >= the tokenizer's vocab "
                            f"size {self.vocab_size} (damaged); {REPREPARE}")
        return out


def open_split(shards_dir: str | os.PathLike, split: str, *, vocab_size: int | None = None,
               seq_len: int | None = None, verify: bool = False) -> TokenRows:
    """Memory-map one split after checking it against the model (vocab) and config (seq_len)."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    tok = manifest["tokenizer"]
    if vocab_size is not None and tok["vocab_size"] > vocab_size:
        raise DataError(
            f"shards in {shards_dir} use tokenizer {tok['name']!r} with vocab_size {tok['vocab_size']} "
            f"but the model's vocab_size is {vocab_size}; set model.vocab_size >= {tok['vocab_size']} "
            "or re-prepare with a matching data.tokenizer")
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise DataError(f"shards in {shards_dir} have seq_len {manifest['seq_len']} but data.seq_len is "
                        f"{seq_len}; {REPREPARE} (or use another data.shards_dir)")
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in {shards_dir}/{MANIFEST_NAME} (has "
                        f"{sorted(manifest['splits'])}); {REPREPARE}")
    dtype = np.dtype(manifest["dtype"])
    arrays, starts = [], [0]
    for entry in manifest["splits"][split]["shards"]:
        path = check_shard(shards_dir, entry, manifest["seq_len"], dtype, verify)
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        starts.append(starts[-1] + entry["rows"])
    return TokenRows(shards_dir, split, manifest, arrays, np.asarray(starts, dtype=np.int64))
