"""Corpus statistics for the manifest (`stats`, read by the report plots) and `describe_stats`.

Everything is computed from streaming counts ({length: documents}), exact and independent of the
corpus size. Document lengths are measured on the final document text (after template and whitespace
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


def _values_counts(counts: dict) -> tuple[np.ndarray, np.ndarray]:
    if not counts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values = np.array(sorted(int(v) for v in counts), dtype=np.int64)
    return values, np.array([counts[v] if v in counts else counts[str(v)] for v in values], dtype=np.int64)


def length_stats(counts: dict, bins: int = HIST_BINS) -> dict:
    """mean/median/mode/min/max and an equal-width histogram, from {length: number of documents}
    (exact, and as big as the number of distinct lengths, not the corpus)."""
    x, n = _values_counts(counts)
    if x.size == 0:
        return {"mean": 0.0, "median": 0.0, "mode": 0, "min": 0, "max": 0,
                "histogram": {"bin_edges": [0, 1], "counts": [0]}}
    lo, hi, total = int(x[0]), int(x[-1]), int(n.sum())
    # Integer-aligned edges so every bin covers the same count of possible lengths.
    width = max(1, -(-(hi + 1 - lo) // bins))
    edges = np.arange(lo, hi + width + 1, width)
    hist, _ = np.histogram(x, bins=edges, weights=n)
    cum = np.cumsum(n)
    lower, upper = x[np.searchsorted(cum, (total - 1) // 2, side="right")], x[np.searchsorted(cum, total // 2,
                                                                                               side="right")]
    return {
        "mean": round(float((x * n).sum() / total), 3), "median": (float(lower) + float(upper)) / 2,
        "mode": int(x[np.argmax(n)]),  # most frequent exact length (smallest on ties)
        "min": lo, "max": hi,
        "histogram": {"bin_edges": [int(e) for e in edges], "counts": [int(c) for c in hist]},
    }


def pad_truncate_stats(token_counts: dict, length: int = PAD_TRUNCATE_LEN) -> dict:
    x, n = _values_counts(token_counts)
    if x.size == 0:
        return {"length": length, "padding_fraction": 0.0, "truncated_documents_fraction": 0.0,
                "truncated_tokens_fraction": 0.0}
    docs = n.sum()
    return {
        "length": length,
        "padding_fraction": round(float((np.maximum(0, length - x) * n).sum() / (docs * length)), 6),
        "truncated_documents_fraction": round(float(n[x > length].sum() / docs), 6),
        "truncated_tokens_fraction": round(float((np.maximum(0, x - length) * n).sum() / max(1, (x * n).sum())), 6),
    }


def word_counts(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))


def count_lengths(counts: dict, lengths: np.ndarray) -> None:
    """Add documents' lengths to a {length: count} dict."""
    values, n = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    for v, c in zip(values.tolist(), n.tolist()):
        counts[v] = counts.get(v, 0) + c


def corpus_stats(word_counts_: dict, token_counts: dict, *, empty_dropped: int, invalid_utf8_replaced: int) -> dict:
    """The manifest's `stats` block from length counts; token lengths exclude the appended EOS."""
    return {
        "documents": int(sum(token_counts.values())),
        "empty_dropped": int(empty_dropped),
        "invalid_utf8_replaced": int(invalid_utf8_replaced),
        "tokens_include_eos": False,
        "words": length_stats(word_counts_),
        "tokens": length_stats(token_counts),
        "pad_truncate_300": pad_truncate_stats(token_counts),
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
