"""`prepare_shards`: documents -> document-level split -> tokens + EOS -> packed rows -> shards, streamed.

Memory is bounded by settings, not by the corpus: documents are read in batches of
`data.read_batch_docs`, tokenized on all cores (tiktoken and `tokenizers` release the GIL, so a
thread pool runs in parallel while the main thread parses the next batch), and rows are written to
shards as each fills (`data.rows_per_shard`). Corpus statistics are exact streaming counts.

Work is done per unit (one per input file; see `sources.py`): each document goes to the train or
val split by a hash of (split_seed, its normalised text) — so renaming, reformatting, re-ordering
or re-chunking a corpus keeps every document on its side, and exact duplicates are never split
between train and val — and each split of each unit is packed on its own: every document
followed by one EOS, concatenated, cut into rows of exactly seq_len tokens, the unit's final partial
row dropped (`dropped_tokens`, < seq_len per unit and split). `pad` packing (the usual Keras recipe,
for comparison): one document a row, cut to seq_len, padded with EOS.

Resumable and shareable: a finished unit leaves a part record (`.part-UUUUU.json`) naming its shards;
a rerun after a kill redoes only unfinished units and gives byte-identical shards. Several processes
(`--num-processes N --process-id I`, or under jax.distributed) each take every N-th unit of one job
into a shared folder (e.g. gs://); whoever finds every part present writes the one manifest, and the
bytes are the same whatever N.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flax_gpt import storage
from flax_gpt.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    check_all_shards,
    read_manifest,
    shard_name,
    token_dtype,
    write_manifest,
    write_shard,
)
from flax_gpt.data.sources import DocumentCounter, Unit, check_not_empty, open_source
from flax_gpt.data.stats import corpus_stats, count_lengths, word_counts
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import DataError

SPLITS = ("train", "val")
ENCODE_CHUNK = 256  # documents per tokenizer job
PART = ".part-{:05d}.json"
# How a document's side is decided, recorded in every manifest (its settings).
SPLIT_RULE = ("validation when (the top 53 bits of blake2b-64(f'{split_seed}\\0' + text)) / 2**53 < val_fraction, "
              "text = the document's text in Unicode NFC with runs of whitespace as one space, stripped")


def prepare_settings(cfg, tokenizer, source_fp: str) -> dict:
    """Everything that determines the shards' bytes; its hash is the manifest fingerprint."""
    return {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source_fp,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "text_column": cfg.text_column if not cfg.template else None,
        "template": cfg.template or None,
        "normalize_whitespace": cfg.normalize_whitespace,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "split_rule": SPLIT_RULE,
        "rows_per_shard": cfg.rows_per_shard,
    }


def fingerprint_of(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def split_documents(texts: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = validation (`SPLIT_RULE`): a function of each document's own text, not
    of where it stands, so a document keeps its side whatever file, format or order holds it."""
    salt = f"{seed}\0".encode()
    draws = np.fromiter((int.from_bytes(hashlib.blake2b(salt + _normalised(t).encode(), digest_size=8).digest(),
                                        "little") >> 11 for t in texts), dtype=np.uint64, count=len(texts))
    return draws.astype(np.float64) / float(1 << 53) < val_fraction


def _normalised(text: str) -> str:
    """The form two copies of one document share: NFC, whitespace runs as one space, no ends."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class SplitWriter:
    """One split of one unit: documents in, full rows out to shard files as they fill."""

    def __init__(self, out, split: str, unit: int, cfg, dtype: np.dtype, eos_id: int, before_write):
        self.out, self.split, self.unit, self.before_write = out, split, unit, before_write
        self.seq_len, self.rows_per_shard, self.packing, self.eos = cfg.seq_len, cfg.rows_per_shard, cfg.packing, eos_id
        self.rows = np.empty((self.rows_per_shard, self.seq_len), dtype)
        self.filled = 0
        self.carry = np.zeros(0, dtype)  # pack: tokens not yet in a full row
        self.shards: list[dict] = []
        self.tokens = self.documents = self.dropped = self.padding = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents (their ids + EOS, concatenated) in order."""
        self.documents += lengths.size
        if self.packing == "pack":
            stream = np.concatenate([self.carry, tokens.astype(self.rows.dtype, copy=False)])
            n = stream.size // self.seq_len
            self._put(stream[: n * self.seq_len].reshape(n, self.seq_len))
            self.carry = stream[n * self.seq_len:]
            self.tokens += n * self.seq_len
            return
        starts = np.cumsum(lengths) - lengths
        for s, n in zip(starts.tolist(), lengths.tolist()):  # one document a row, cut and padded
            row = np.full((1, self.seq_len), self.eos, self.rows.dtype)
            keep = min(n, self.seq_len)
            row[0, :keep] = tokens[s:s + keep]
            self._put(row)
            self.tokens += keep
            self.dropped += n - keep
            self.padding += self.seq_len - keep

    def _put(self, rows: np.ndarray) -> None:
        while rows.shape[0]:
            take = min(rows.shape[0], self.rows_per_shard - self.filled)
            self.rows[self.filled:self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            self.before_write()
            name = shard_name(self.split, self.unit, len(self.shards))
            self.shards.append(write_shard(self.out, name, self.rows[: self.filled]))
            self.filled = 0

    def finish(self) -> dict:
        self._flush()
        self.dropped += self.carry.size
        return {"rows": sum(e["rows"] for e in self.shards), "tokens": self.tokens, "documents": self.documents,
                "dropped_tokens": self.dropped, "padding_tokens": self.padding, "shards": self.shards}


def prepare_unit(unit: Unit, index: int, cfg, tokenizer, out, pool: ThreadPoolExecutor, threads: int,
                 before_write=lambda: None) -> dict:
    """Read, split, tokenize and write one unit; return its part record."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {name: SplitWriter(out, name, index, cfg, dtype, tokenizer.eos_id, before_write) for name in SPLITS}
    counter, words, tokens_len = DocumentCounter(), {}, {}
    pending: queue.SimpleQueue = queue.SimpleQueue()
    in_flight = 0

    def drain(limit: int) -> None:
        nonlocal in_flight
        while in_flight > limit:
            future, n_words, is_val = pending.get()
            in_flight -= 1
            toks, lengths = future.result()  # lengths include the EOS
            count_lengths(tokens_len, lengths - 1)
            count_lengths(words, n_words)
            token_is_val = np.repeat(is_val, lengths)
            for name, sel, tsel in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
                if sel.any():
                    writers[name].add(toks[tsel], lengths[sel])

    for table in unit.tables():
        texts = counter.texts(table, cfg)
        for i in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[i:i + ENCODE_CHUNK]
            pending.put((pool.submit(tokenizer.encode_concat, chunk, 1), word_counts(chunk),
                         split_documents(chunk, cfg.val_fraction, cfg.split_seed)))
            in_flight += 1
            drain(4 * threads)  # bounded: memory stays a few batches, whatever the corpus
    drain(0)
    return {"unit": index, "key": unit.key, "splits": {n: w.finish() for n, w in writers.items()},
            "words": words, "tokens": tokens_len, "rows_read": counter.rows_read,
            "empty_dropped": counter.empty_dropped, "invalid_utf8_replaced": counter.invalid_utf8_replaced}


def _settings_diff(old: dict, new: dict) -> str:
    """What changed, in config terms: 'data.seq_len 64 -> 128, data.source (contents)'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "source_fingerprint":
            out.append("data.source (files, contents or synthetic_docs)")
        elif key == "tokenizer_fingerprint":
            out.append("data.tokenizer (files)")
        elif key == "format_version":
            out.append(f"format {a} -> {b}")
        else:
            out.append(f"data.{key} {a!r} -> {b!r}")
    return ", ".join(out) if out else "format"


def _read_part(out, index: int, fingerprint: str) -> dict | None:
    path = storage.location(out) / PART.format(index)
    try:
        part = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None
    if not part or part.get("fingerprint") != fingerprint:
        return None
    try:
        check_all_shards(out, {"splits": part["splits"], "dtype": part["dtype"], "seq_len": part["seq_len"]})
    except DataError:
        return None
    return part


def prepare_shards(cfg, *, overwrite: bool = False, verify: bool = False, log=print,
                   num_processes: int = 1, process_id: int = 0) -> dict | None:
    """Write `cfg.shards_dir/manifest.json` + shards (or reuse matching ones); return the manifest,
    or None when this process finished its units and others are still working."""
    log = log or (lambda *_: None)
    cfg.validate()
    out = cfg.shards_dir
    storage.check_output(out, "shards", reuse=True)
    storage.check_writable(out, "data.shards_dir")
    source = open_source(cfg)  # resolves the source: fails early
    tokenizer = load_tokenizer(cfg.tokenizer)
    settings = prepare_settings(cfg, tokenizer, source.fingerprint)
    fingerprint = fingerprint_of(settings)
    folder = storage.location(out)

    old = _old_manifest(out, overwrite)
    if old is not None and not overwrite and _reusable(out, old, settings, fingerprint, verify, log):
        return old

    t0 = time.perf_counter()
    started = []

    def start_writing():  # at the first write: nothing is created by a run that fails before
        if not started:
            storage.mark(out, "shards")
            if old is not None and (folder / MANIFEST_NAME).exists():  # never describing new shards
                (folder / MANIFEST_NAME).unlink()
            started.append(True)

    dtype = token_dtype(tokenizer.vocab_size)
    mine = [i for i in range(len(source.units)) if i % num_processes == process_id]
    threads = max(1, getattr(tokenizer, "num_threads", 1))
    before = _state_of(out, set_aside=old is not None)
    with ThreadPoolExecutor(threads) as pool:
        for i in mine:
            _write_unit(source.units[i], i, cfg, tokenizer, out, pool, threads, start_writing, fingerprint, log)
    parts = [_read_part(out, i, fingerprint) for i in range(len(source.units))]
    if any(p is None for p in parts):
        log(f"process {process_id}/{num_processes}: units {mine} written; the manifest is written by the "
            "process that finishes last")
        return None
    try:
        manifest = _merge(parts, cfg, tokenizer, source, settings, fingerprint, dtype)
    except DataError:  # no documents in any unit: nothing may look like shards afterwards
        _put_back(out, before, len(source.units))
        raise
    start_writing()
    write_manifest(out, manifest)
    _remove_stale(folder, manifest)
    _log_written(manifest, cfg, out, source.description, time.perf_counter() - t0, log)
    return manifest


def _old_manifest(out, overwrite: bool) -> dict | None:
    """The manifest already in `out`, or None: there is none, or it is unreadable and being overwritten."""
    if not (storage.location(out) / MANIFEST_NAME).exists():
        return None
    try:
        return read_manifest(out)
    except DataError:
        if not overwrite:
            raise
        return None


def _reusable(out, old: dict, settings: dict, fingerprint: str, verify: bool, log) -> bool:
    """Whether the shards in `out` were prepared from these inputs and are whole; DataError when
    they come from other inputs."""
    if old.get("fingerprint") != fingerprint:
        raise DataError(
            f"{out} already holds shards prepared from different inputs (differs in: "
            f"{_settings_diff(old.get('settings', {}), settings)}); pass --overwrite to replace "
            "them (flax-gpt train: --overwrite-data) or set another data.shards_dir")
    try:
        check_all_shards(out, old, verify=verify)
    except DataError as e:
        log(f"existing shards are damaged ({e}); rebuilding them from the same inputs")
        return False
    log(f"shards in {out} match the inputs (fingerprint {old['fingerprint'][:12]}); reusing them")
    return True


def _write_unit(unit: Unit, index: int, cfg, tokenizer, out, pool: ThreadPoolExecutor, threads: int, start_writing,
                fingerprint: str, log) -> None:
    """Prepare one unit and record its part, unless an earlier run already finished it."""
    if _read_part(out, index, fingerprint) is not None:
        log(f"unit {index} ({unit.key}) was finished by an earlier run; kept")
        return
    part = prepare_unit(unit, index, cfg, tokenizer, out, pool, threads, start_writing)
    part.update(fingerprint=fingerprint, dtype=token_dtype(tokenizer.vocab_size).name, seq_len=cfg.seq_len)
    start_writing()
    storage.write_atomic(storage.location(out) / PART.format(index), json.dumps(part))


def _log_written(manifest: dict, cfg, out, description: str, seconds: float, log) -> None:
    stats, splits = manifest["stats"], manifest["splits"]
    total = sum(s["tokens"] for s in splits.values())
    log(f"read {stats['documents']:,} documents from {description}"
        + (f" ({stats['empty_dropped']} empty dropped)" if stats["empty_dropped"] else ""))
    if cfg.val_fraction > 0 and splits["val"]["rows"] == 0:
        log(f"warning: the validation split has no rows ({splits['val']['tokens']:,} tokens < "
            f"data.seq_len {cfg.seq_len}); training will run without evaluation - raise data.val_fraction "
            "or add text")
    log(f"wrote {sum(s['rows'] for s in splits.values()):,} rows ({total:,} tokens) to {out} in "
        f"{seconds:.1f}s")


def _merge(parts: list[dict], cfg, tokenizer, source, settings: dict, fingerprint: str, dtype) -> dict:
    splits = {}
    for name in SPLITS:
        per = [p["splits"][name] for p in parts]
        splits[name] = {k: sum(s[k] for s in per) for k in ("rows", "tokens", "documents", "dropped_tokens",
                                                             "padding_tokens")}
        splits[name]["shards"] = [e for s in per for e in s["shards"]]
    words, tokens, counter = {}, {}, DocumentCounter()
    for p in parts:
        for target, counts in ((words, p["words"]), (tokens, p["tokens"])):
            for k, v in counts.items():
                target[int(k)] = target.get(int(k), 0) + v
        counter.rows_read += p["rows_read"]
        counter.empty_dropped += p["empty_dropped"]
        counter.invalid_utf8_replaced += p["invalid_utf8_replaced"]
    check_not_empty(sum(tokens.values()), counter, source.description)
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.describe(),
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "packing": cfg.packing,
        "source": {"description": source.description, "fingerprint": source.fingerprint,
                   "synthetic": source.synthetic, "units": [p["key"] for p in parts],
                   "spec": cfg.source if isinstance(cfg.source, str) else list(map(str, cfg.source)),
                   "text_column": settings["text_column"], "template": settings["template"]},
        "fingerprint": fingerprint,
        "settings": settings,
        "splits": splits,
        "stats": corpus_stats(words, tokens, empty_dropped=counter.empty_dropped,
                              invalid_utf8_replaced=counter.invalid_utf8_replaced),
    }


def _state_of(out, set_aside: bool) -> dict:
    """What `_put_back` restores: the manifest that the first write sets aside, whether the folder
    was marked, and which local folders the first write creates (deepest first)."""
    folder = storage.location(out)
    created = []
    if not storage.is_remote(out):
        p = Path(os.path.abspath(str(out)))
        while not p.exists():
            created.append(p)
            p = p.parent
    manifest = folder / MANIFEST_NAME
    return {"manifest": manifest.read_bytes() if set_aside and manifest.exists() else None,
            "marked": (folder / storage.MARKER).exists(), "created": created}


def _put_back(out, before: dict, units: int) -> None:
    """Undo a job that found no documents in any unit. No unit wrote a shard (each needs a
    document), so what the job wrote is its part records, the marker and the folder; a manifest
    of earlier shards that it set aside comes back. Anything else in the folder stays."""
    folder = storage.location(out)
    for i in range(units):
        (folder / PART.format(i)).unlink(missing_ok=True)
    if before["manifest"] is not None and not (folder / MANIFEST_NAME).exists():
        storage.write_atomic(folder / MANIFEST_NAME, before["manifest"])
    marker = folder / storage.MARKER
    # Also when another process of the job marked it: an otherwise empty folder is no shards folder.
    if marker.exists() and (not before["marked"] or [p.name for p in folder.iterdir()] == [storage.MARKER]):
        marker.unlink()
    for p in before["created"]:
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def _remove_stale(folder, manifest: dict) -> None:
    """Delete what the manifest does not use: shards of a replaced manifest, part records, tmps."""
    keep = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    for p in folder.iterdir():
        name = p.name
        ours = (name.endswith(".npy") and name.split("-")[0] in SPLITS) or name.startswith(".part-") or \
            (name.startswith(".") and name.endswith(".tmp"))
        if ours and name not in keep:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
