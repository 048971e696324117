"""Data pipeline: text -> packed token shards + manifest.json -> deterministic per-process batches.

Layout (one job per module):
  tokenizer.py  GPT-2 BPE offline (tiktoken fast path, identical ids to transformers) or any HF tokenizer
  sources.py    read documents: Hub dataset, local csv/json/jsonl/parquet/txt, or `synthetic`
  synthetic.py  the deterministic, seeded generator of abstract-like ML text
  prepare.py    documents -> split -> tokens -> packed rows -> shards + manifest (`prepare_shards`)
  shards.py     the on-disk format: manifest checks, atomic shard writes, memory-mapped `TokenRows`
  loader.py     `TrainLoader` / `EvalLoader`: batches as pure functions of (seed, step); the one
                host->device boundary (`jax.make_array_from_process_local_data`)
  stats.py      corpus statistics (words/tokens histograms, pad/truncate-to-300 waste) and
                `describe_stats`

Nothing here imports jax at module level; only the loader's boundary function does, lazily.
"""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem (bad path, wrong column, corrupt shard...); one line: problem + fix."""


# Public names resolve lazily (PEP 562): `import flax_gpt.data.tokenizer` stays light, and
# `python -m flax_gpt.data.prepare` does not import prepare twice.
_EXPORTS = {
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "FORMAT_VERSION": "shards", "MANIFEST_NAME": "shards", "TokenRows": "shards",
    "open_split": "shards", "read_manifest": "shards",
    "TrainLoader": "loader", "EvalLoader": "loader", "make_batch": "loader",
    "describe_stats": "stats", "prepare_shards": "prepare",
}

__all__ = ["DataError", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f"flax_gpt.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flax_gpt.data' has no attribute {name!r}")
