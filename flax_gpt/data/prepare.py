"""`prepare_shards`: documents -> document-level split -> tokens + EOS -> packed rows -> shards.

Packing (`data.packing=pack`, the default): each split's documents, in source order, are encoded,
each followed by one EOS, concatenated, and cut into rows of exactly seq_len tokens. Documents span
row boundaries; nothing is truncated or padded. Only the final partial row is dropped, and the
manifest records how many tokens that was (`dropped_tokens`, always < seq_len).

`pad` (the usual Keras recipe, kept for comparison): one document a row, its tokens + EOS cut to
seq_len (`dropped_tokens` counts what was cut), then padded with EOS. The loader masks the loss
after the first EOS target of each row, so padding costs compute but is never learned.

Split: a seeded permutation of document indices (`np.random.default_rng([split_seed, N])`) puts
round(N * val_fraction) documents (at least 1 when val_fraction > 0 and N > 1) into `val`; each
split then keeps source order. A document is in exactly one split.

`flax-gpt prepare CONFIG [section.key=value ...] [--overwrite] [--verify]` runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flax_gpt import storage
from flax_gpt.errors import DataError
from flax_gpt.data.shards import (
    FORMAT_VERSION, MANIFEST_NAME, check_all_shards, read_manifest, shard_name, token_dtype,
    write_manifest, write_shard,
)
from flax_gpt.data.sources import DocumentStream, source_fingerprint
from flax_gpt.data.stats import corpus_stats, word_counts
from flax_gpt.data.tokenizer import load_tokenizer

SPLITS = ("train", "val")


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
        "rows_per_shard": cfg.rows_per_shard,
    }


def fingerprint_of(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def split_documents(num_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = validation document."""
    n_val = int(round(num_docs * val_fraction))
    if val_fraction > 0 and num_docs > 1:
        n_val = min(max(n_val, 1), num_docs - 1)
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[np.random.default_rng([seed, num_docs]).permutation(num_docs)[:n_val]] = True
    return is_val


def pack_rows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """(rows (n, T), dropped token count): contiguous rows of T tokens, final partial row dropped."""
    n = tokens.size // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len), int(tokens.size - n * seq_len)


def pad_rows(tokens: np.ndarray, lengths: np.ndarray, seq_len: int, eos_id: int) -> tuple[np.ndarray, int, int]:
    """(rows (docs, T), kept tokens, cut tokens): one document a row, cut to T, padded with EOS."""
    starts = np.cumsum(lengths) - lengths
    keep = np.minimum(lengths, seq_len)
    rows = np.full((lengths.size, seq_len), eos_id, dtype=tokens.dtype)
    total = int(keep.sum())
    row_of = np.repeat(np.arange(lengths.size), keep)
    col = np.arange(total) - np.repeat(np.cumsum(keep) - keep, keep)
    rows[row_of, col] = tokens[np.repeat(starts, keep) + col]
    return rows, total, int(lengths.sum() - total)


ENCODE_CHUNK = 512  # documents per tokenizer job: small enough to start while the next file parses


def encode_stream(stream, tokenizer) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(texts, tokens, lengths, word counts) of a DocumentStream, tokenizing while parsing.

    Parsing (csv/json, whitespace normalisation) and word counting hold the GIL on this thread;
    tiktoken releases it, so the jobs submitted to the pool run on the other cores meanwhile
    instead of after reading."""
    threads = max(1, getattr(tokenizer, "num_threads", os.cpu_count() or 1))
    texts: list[str] = []
    words: list[np.ndarray] = []
    futures = []
    with ThreadPoolExecutor(threads) as pool:
        for chunk in stream:
            for i in range(0, len(chunk), ENCODE_CHUNK):
                futures.append(pool.submit(tokenizer.encode_concat, chunk[i:i + ENCODE_CHUNK], 1))
            texts += chunk
            words.append(word_counts(chunk))
        parts = [f.result() for f in futures]
    if not parts:
        return texts, np.zeros(0, np.uint32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (texts, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate(words))


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
        else:
            out.append(f"data.{key} {a!r} -> {b!r}")
    return ", ".join(out) if out else "format"


def prepare_shards(cfg, *, overwrite: bool = False, verify: bool = False, log=print) -> dict:
    """Write `cfg.shards_dir/manifest.json` + shards (or reuse matching ones); return the manifest."""
    log = log or (lambda *_: None)
    cfg.validate()
    out = Path(cfg.shards_dir)
    storage.check_output(out, "shards", reuse=True)
    storage.check_writable(out, "data.shards_dir")
    source_fp, description, synthetic = source_fingerprint(cfg)  # resolves the source: fails early
    tokenizer = load_tokenizer(cfg.tokenizer)
    settings = prepare_settings(cfg, tokenizer, source_fp)
    fingerprint = fingerprint_of(settings)

    old = None
    if (out / MANIFEST_NAME).exists():
        try:
            old = read_manifest(out)
        except DataError:
            if not overwrite:
                raise
        if old is not None and not overwrite:
            if old.get("fingerprint") != fingerprint:
                raise DataError(
                    f"{out} already holds shards prepared from different inputs (differs in: "
                    f"{_settings_diff(old.get('settings', {}), settings)}); pass --overwrite to replace "
                    "them (flax-gpt train: --overwrite-data) or set another data.shards_dir")
            try:
                check_all_shards(out, old, verify=verify)
                log(f"shards in {out} match the inputs (fingerprint {fingerprint[:12]}); reusing them")
                return old
            except DataError as e:
                log(f"existing shards are damaged ({e}); rebuilding them from the same inputs")

    t0 = time.perf_counter()
    stream = DocumentStream(cfg)
    texts, tokens, lengths, words = encode_stream(stream, tokenizer)  # lengths include the EOS
    stream.check_not_empty(len(texts))
    log(f"read {len(texts):,} documents from {description}"
        + (f" ({stream.empty_dropped} empty dropped)" if stream.empty_dropped else ""))
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = tokens.astype(dtype, copy=False)
    is_val = split_documents(len(texts), cfg.val_fraction, cfg.split_seed)
    token_is_val = np.repeat(is_val, lengths)

    storage.mark(out, "shards")
    if old is not None:  # overwrite: the old manifest goes first so it never describes new shards
        (out / MANIFEST_NAME).unlink()
    splits = {}
    for name in SPLITS:
        sel = is_val if name == "val" else ~is_val
        split_tokens = tokens[token_is_val == (name == "val")]
        if cfg.packing == "pack":
            rows, dropped = pack_rows(split_tokens, cfg.seq_len)
            kept, padding = int(rows.size), 0
        else:
            rows, kept, dropped = pad_rows(split_tokens, lengths[sel], cfg.seq_len, tokenizer.eos_id)
            padding = int(rows.size) - kept
        shards = [write_shard(out / shard_name(name, i), rows[start:start + cfg.rows_per_shard])
                  for i, start in enumerate(range(0, rows.shape[0], cfg.rows_per_shard))]
        # tokens: real tokens stored in rows (EOS included, padding excluded).
        splits[name] = {"rows": int(rows.shape[0]), "tokens": kept, "documents": int(sel.sum()),
                        "dropped_tokens": dropped, "padding_tokens": padding, "shards": shards}

    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.describe(),
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "packing": cfg.packing,
        "source": {"description": description, "fingerprint": source_fp, "synthetic": synthetic,
                   "spec": cfg.source if isinstance(cfg.source, str) else list(map(str, cfg.source)),
                   "text_column": settings["text_column"], "template": settings["template"]},
        "fingerprint": fingerprint,
        "settings": settings,
        "splits": splits,
        "stats": corpus_stats(texts, lengths - 1, empty_dropped=stream.empty_dropped,
                              invalid_utf8_replaced=stream.invalid_utf8_replaced, words=words),
        "created_unix": round(time.time(), 3),
    }
    write_manifest(out, manifest)
    _remove_stale(out, old, manifest)
    if cfg.val_fraction > 0 and splits["val"]["rows"] == 0:
        log(f"warning: the validation split has no rows ({splits['val']['tokens']:,} tokens < data.seq_len "
            f"{cfg.seq_len}); training will run without evaluation - raise data.val_fraction or add text")
    total = sum(s["tokens"] for s in splits.values())
    log(f"wrote {sum(s['rows'] for s in splits.values()):,} rows ({total:,} tokens) to {out} in "
        f"{time.perf_counter() - t0:.1f}s")
    return manifest


def _remove_stale(out: Path, old: dict | None, new: dict) -> None:
    """Delete shard files of a replaced manifest that the new one does not use, and stray tmps."""
    keep = {e["file"] for s in new["splits"].values() for e in s["shards"]}
    stale = set()
    if old is not None:
        stale |= {e["file"] for s in old.get("splits", {}).values() for e in s.get("shards", [])}
    stale |= {p.name for p in out.glob(".*.tmp")}  # leftovers of an interrupted write
    for name in stale - keep:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass

