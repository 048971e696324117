"""Data pipeline: text -> packed token shards + manifest.json -> deterministic per-process batches.

One job per module:
  tokenizer.py  GPT-2 BPE offline (tiktoken fast path, identical ids to transformers) or any HF tokenizer
  sources.py    read documents: Hub dataset, local csv/json/jsonl/parquet/txt, or `synthetic`
  synthetic.py  the deterministic, seeded generator of abstract-like ML text
  prepare.py    documents -> split -> tokens -> packed rows -> shards + manifest (`prepare_shards`)
  shards.py     the on-disk format: manifest checks, atomic shard writes, memory-mapped `TokenRows`
  loader.py     `TrainLoader` / `EvalLoader`: batches as pure functions of (seed, step); the one
                host->device boundary (`jax.make_array_from_process_local_data`)
  stats.py      corpus statistics (words/tokens histograms, pad/truncate-to-300 waste) and
                `describe_stats`

Nothing here imports jax at module level; only the loader's boundary function does.
"""
