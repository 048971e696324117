"""The on-disk format (**contract**): `<shards_dir>/manifest.json` + `<split>-UUUUU-NNNNN.npy` shards
(format 2: unit U's N-th shard of a split; format 1's `<split>-NNNNN.npy` is still read).

Each shard is a plain `.npy` array of shape (rows, seq_len), dtype uint16 when the vocabulary fits
(< 65536 ids) else uint32, `rows_per_shard` rows except a unit's last shard of a split. Files are
written to a temporary name and renamed into place (a bucket object is written whole), and the
manifest is written last, so a folder with a manifest always has complete shards. The manifest's
`splits.<split>.shards` lists them in order; readers need nothing else.

`open_split` checks, in this order: manifest present and readable, format version, tokenizer
vocab vs the model's vocab, seq_len vs the config, each shard present with the expected shape and
byte size (and, with verify, sha256). Every failure is a one-line DataError naming the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flax_gpt import storage
from flax_gpt.errors import DataError

# 3: each document's side decided by its text (prepare.SPLIT_RULE). Shards of 1 (one stream per
# split) and 2 (side by file and position) are refused: their split moves when a file is renamed.
FORMAT_VERSION = 3
READABLE_VERSIONS = (3,)
MANIFEST_NAME = "manifest.json"
REPREPARE = "re-run `flax-gpt prepare` with --overwrite"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def shard_name(split: str, unit: int, index: int) -> str:
    return f"{split}-{unit:05d}-{index:05d}.npy"


def shard_bytes(rows: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows), allow_pickle=False)
    return buf.getvalue()


def write_shard(shards_dir, name: str, rows: np.ndarray) -> dict:
    """Write one (rows, T) array as .npy (atomically: a temporary name, then renamed); return its
    manifest entry."""
    data = shard_bytes(rows)
    storage.write_atomic(storage.location(shards_dir) / name, data)
    return {"file": name, "rows": int(rows.shape[0]), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(shards_dir, manifest: dict) -> None:
    storage.write_atomic(storage.location(shards_dir) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def read_manifest(shards_dir) -> dict:
    folder = storage.location(shards_dir)
    path = folder / MANIFEST_NAME
    if not path.exists():
        hint = "" if folder.is_dir() else " (the folder does not exist)"
        raise DataError(f"no {MANIFEST_NAME} in {shards_dir}{hint}; run `flax-gpt prepare CONFIG` first "
                        "or point data.shards_dir at prepared shards")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}); {REPREPARE}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise DataError(f"{path} is not a flax_gpt shard manifest; {REPREPARE}")
    if manifest["format_version"] not in READABLE_VERSIONS:
        raise DataError(f"{path} has format_version {manifest['format_version']} but this flax_gpt reads "
                        f"versions {READABLE_VERSIONS} (since 3 a document's train/val side follows its text, "
                        f"not its file and position); {REPREPARE}")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged or not written by flax-gpt prepare: {problem}; {REPREPARE}")
    return manifest


def _count(value, least: int = 0) -> bool:
    return type(value) is int and value >= least  # JSON true is a bool, not a count


def _manifest_problem(m: dict) -> str | None:
    """What a readable-version manifest lacks that readers index without looking, or None."""
    if not _tokenizer_ok(m.get("tokenizer")):
        return "no tokenizer {name, vocab_size, eos_id < vocab_size}"
    if not _count(m.get("seq_len"), 1):
        return f"seq_len {m.get('seq_len')!r} is not a positive integer"
    # Token ids are unsigned: a signed dtype could hold negative ids, which index the embedding
    # table from its end instead of failing.
    if m.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {m.get('dtype')!r} is not uint16 or uint32 (token ids are unsigned)"
    if not isinstance(m.get("fingerprint"), str) or not isinstance(m.get("packing"), str):
        return "no fingerprint or packing"
    return _splits_problem(m.get("splits"))


def _tokenizer_ok(tok) -> bool:
    return isinstance(tok, dict) and isinstance(tok.get("name"), str) and _count(tok.get("vocab_size"), 1) \
        and _count(tok.get("eos_id")) and tok["eos_id"] < tok["vocab_size"]


def _splits_problem(splits) -> str | None:
    if not isinstance(splits, dict) or not splits:
        return "no splits"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(_shard_entry_ok(e) for e in shards):
            return f"split {name!r} has no list of shards {{file, rows, bytes, sha256}}"
    return None


def _shard_entry_ok(e) -> bool:
    return isinstance(e, dict) and isinstance(e.get("file"), str) and Path(e["file"]).name == e["file"] \
        and _count(e.get("rows")) and _count(e.get("bytes")) and isinstance(e.get("sha256"), str)


def local_copy(shards_dir, manifest: dict) -> Path:
    """The shards as a local folder: the folder itself, or for a bucket a verified local cache.

    Bucket shards are downloaded once into FLAX_GPT_CACHE/shards/<manifest fingerprint>/ and each
    file's sha256 checked against the manifest (cost: the shards' size on local disk and one read
    of them; training then memory-maps them like local shards)."""
    if not storage.is_remote(shards_dir):
        return Path(str(storage.location(shards_dir)))
    cache = storage.cache_dir("shards") / manifest["fingerprint"][:32]
    cache.mkdir(parents=True, exist_ok=True)
    remote = storage.location(shards_dir)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            dest = cache / entry["file"]
            if dest.is_file() and dest.stat().st_size == entry["bytes"]:
                continue
            data = (remote / entry["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise DataError(f"shard {remote / entry['file']} fails its sha256 check (corrupted); {REPREPARE}")
            storage.write_atomic(dest, data)
    return cache


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
    except Exception:  # noqa: BLE001 - numpy raises several types for a damaged header
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


def check_all_shards(shards_dir, manifest: dict, verify: bool = False) -> None:
    if storage.is_remote(shards_dir):  # every object present with its size; --verify reads them
        folder = storage.location(shards_dir)
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                path = folder / entry["file"]
                if not path.exists() or path.stat().length != entry["bytes"]:
                    raise DataError(f"shard {path} is missing or truncated; {REPREPARE}")
                if verify and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                    raise DataError(f"shard {path} fails its sha256 check (corrupted); {REPREPARE}")
        return
    dtype = np.dtype(manifest["dtype"])
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            check_shard(Path(str(storage.location(shards_dir))), entry, manifest["seq_len"], dtype, verify)


@dataclass
class TokenRows:
    """A split's packed rows, memory-mapped; `rows(indices)` gathers them as int32 (n, T)."""

    shards_dir: str | Path
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
        # Negative after the int32 cast: a uint32 id >= 2**31 (damaged), which would index from the end.
        if out.max(initial=0) >= self.vocab_size or out.min(initial=0) < 0:
            bad = int(shard[np.flatnonzero(((out >= self.vocab_size) | (out < 0)).any(axis=1))[0]])
            entry = self.manifest["splits"][self.split]["shards"][bad]
            raise DataError(f"shard {storage.location(self.shards_dir) / entry['file']} holds token ids >= the "
                            f"tokenizer's vocab size {self.vocab_size} or below 0 (damaged); {REPREPARE}")
        return out


def open_split(shards_dir, split: str, *, vocab_size: int | None = None,
               seq_len: int | None = None, verify: bool = False) -> TokenRows:
    """Memory-map one split after checking it against the model (vocab) and config (seq_len).
    Shards in a bucket are read from a verified local cache (`local_copy`)."""
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
    local = local_copy(shards_dir, manifest)
    arrays, starts = [], [0]
    for entry in manifest["splits"][split]["shards"]:
        path = check_shard(local, entry, manifest["seq_len"], dtype, verify)
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        starts.append(starts[-1] + entry["rows"])
    return TokenRows(shards_dir, split, manifest, arrays, np.asarray(starts, dtype=np.int64))
