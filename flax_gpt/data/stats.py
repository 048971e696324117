"""Corpus statistics for the manifest (`stats`, read by the report plots) and `describe_stats`.

Document lengths are measured on the final document text (after template and whitespace
normalisation): words = `len(text.split())`; tokens = the tokenizer's ids for the text, WITHOUT the
EOS we append (the length a reader thinks of as "the document"; packing stores length + 1).

`pad_truncate_300` is what the usual recipe (one document per row, padded or truncated to 300
tokens, no EOS) would do to the same documents:
  padding_fraction            = pad slots / (documents * 300)       (compute spent on padding)
  truncated_documents_fraction = documents longer than 300 / documents
  truncated_tokens_fraction   = tokens cut off / all document tokens  (text never trained on)
Packing wastes neither: its only loss is the final partial row (`splits.*.dropped_tokens`).
"""

from __future__ import annotations

import numpy as np

PAD_TRUNCATE_LEN = 300
HIST_BINS = 40


def length_stats(lengths: np.ndarray, bins: int = HIST_BINS) -> dict:
    """mean/median/mode/min/max and an equal-width histogram of integer lengths."""
    x = np.asarray(lengths, dtype=np.int64)
    if x.size == 0:
        return {"mean": 0.0, "median": 0.0, "mode": 0, "min": 0, "max": 0,
                "histogram": {"bin_edges": [0, 1], "counts": [0]}}
    lo, hi = int(x.min()), int(x.max())
    # Integer-aligned edges so every bin covers the same count of possible lengths.
    width = max(1, -(-(hi + 1 - lo) // bins))
    edges = np.arange(lo, hi + width + 1, width)
    counts, _ = np.histogram(x, bins=edges)
    mode = int(np.argmax(np.bincount(x - lo))) + lo  # most frequent exact length (smallest on ties)
    return {
        "mean": round(float(x.mean()), 3), "median": float(np.median(x)), "mode": mode,
        "min": lo, "max": hi,
        "histogram": {"bin_edges": [int(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def pad_truncate_stats(token_lengths: np.ndarray, length: int = PAD_TRUNCATE_LEN) -> dict:
    n = np.asarray(token_lengths, dtype=np.int64)
    if n.size == 0:
        return {"length": length, "padding_fraction": 0.0, "truncated_documents_fraction": 0.0,
                "truncated_tokens_fraction": 0.0}
    pad = np.maximum(0, length - n).sum()
    cut = np.maximum(0, n - length).sum()
    return {
        "length": length,
        "padding_fraction": round(float(pad / (n.size * length)), 6),
        "truncated_documents_fraction": round(float((n > length).mean()), 6),
        "truncated_tokens_fraction": round(float(cut / max(1, n.sum())), 6),
    }


def word_counts(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))


def corpus_stats(texts: list[str], token_lengths: np.ndarray, *, empty_dropped: int,
                 invalid_utf8_replaced: int, words: np.ndarray | None = None) -> dict:
    """The manifest's `stats` block; `token_lengths` excludes the appended EOS; `words` may be
    precomputed `word_counts(texts)`."""
    return {
        "documents": len(texts),
        "empty_dropped": int(empty_dropped),
        "invalid_utf8_replaced": int(invalid_utf8_replaced),
        "tokens_include_eos": False,
        "words": length_stats(word_counts(texts) if words is None else words),
        "tokens": length_stats(token_lengths),
        "pad_truncate_300": pad_truncate_stats(token_lengths),
    }


def _fmt_len(d: dict) -> str:
    return (f"mean {d['mean']:.1f}, median {d['median']:.0f}, mode {d['mode']}, "
            f"min {d['min']}, max {d['max']}")


def _sparkline(counts: list[int]) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    top = max(counts) if counts else 0
    return "".join(bars[0 if c == 0 else 1 + int(7 * c / top)] for c in counts) if top else ""


def describe_stats(manifest: dict) -> str:
    """A readable multi-line summary of a manifest (printed by `flax-gpt prepare`)."""
    s = manifest.get("stats", {})
    tok = manifest["tokenizer"]
    src = manifest["source"]
    lines = [
        f"source     : {src['description']}" + ("  [SYNTHETIC]" if src.get("synthetic") else ""),
        f"tokenizer  : {tok['name']} (vocab {tok['vocab_size']}, eos {tok['eos_id']}); "
        f"seq_len {manifest['seq_len']}, packing {manifest['packing']}, dtype {manifest['dtype']}",
        f"documents  : {s.get('documents', 0):,} kept, {s.get('empty_dropped', 0):,} empty dropped, "
        f"{s.get('invalid_utf8_replaced', 0):,} invalid UTF-8 bytes replaced",
    ]
    for key, unit in (("words", "words"), ("tokens", "tokens (without EOS)")):
        if key in s:
            lines.append(f"length     : {unit}: {_fmt_len(s[key])}")
            lines.append(f"             histogram {s[key]['histogram']['bin_edges'][0]}"
                         f"..{s[key]['histogram']['bin_edges'][-1]}: {_sparkline(s[key]['histogram']['counts'])}")
    for name, sp in manifest.get("splits", {}).items():
        lines.append(f"split {name:<5}: {sp['rows']:,} rows, {sp['tokens']:,} tokens, "
                     f"{sp['documents']:,} documents, {sp['dropped_tokens']:,} tokens dropped, "
                     f"{len(sp['shards'])} shard(s)")
    p = s.get("pad_truncate_300")
    if p:
        packed = sum(sp["tokens"] for sp in manifest.get("splits", {}).values())
        dropped = sum(sp["dropped_tokens"] for sp in manifest.get("splits", {}).values())
        lines.append(
            f"vs pad/truncate to {p.get('length', PAD_TRUNCATE_LEN)}: {100 * p['padding_fraction']:.1f}% of "
            f"slots would be padding, {100 * p['truncated_documents_fraction']:.1f}% of documents "
            f"truncated ({100 * p['truncated_tokens_fraction']:.1f}% of tokens cut); "
            f"{manifest['packing']}: {100 * dropped / max(1, packed + dropped):.2f}% of tokens dropped")
    return "\n".join(lines)
