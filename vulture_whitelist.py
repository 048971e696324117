"""Names `vulture flax_gpt vulture_whitelist.py --min-confidence 60` would report as unused, with why
each stays. Vulture matches by name and only parses this file; it is never imported or run. The
format is the one `vulture --make-whitelist` writes: bare names and `_.attribute` lookups.

Keep it short: a name belongs here only when something vulture cannot see uses it (a user, a
framework, a decorator) or when its removal belongs to another change (said so below).
"""
# ruff: noqa: B018, F821 - expressions naming what is used, on purpose

from flax_gpt import api

# The notebook API (`flax_gpt.api`, shown in the README): called by users, not by the library.
api.prepare
api.LM.from_hf
api.LM.export
api.LM.plots

# Flax linen calls a module's `setup` itself (flax_gpt/model/gpt2.py, flax_gpt/model/llama.py).
_.setup

# Pallas kernel bodies registered by decorator (`@pl.when(...)` in flax_gpt/model/loss_kernel.py):
# the decorator runs them; the name `_` is never read.
_

# A signal handler's frame and a context manager's `__exit__` arguments are fixed by the protocol
# (flax_gpt/train/trainer.py; the other modules name theirs `_frame` and `*_exc`).
frame
exc

# Attributes set for their effect on the object (flax_gpt/data/): a read-only numpy array
# (`flags.writeable`) and the parts of a `tokenizers.Tokenizer` saved to tokenizer.json.
_.writeable
_.pre_tokenizer
_.decoder
_.post_processor

# Helpers outside the library's own path: `read_documents` reads a source into memory
# (benchmarks/data_pipeline.py and the data tests); `generate_table` writes the synthetic corpus as
# a csv/jsonl/parquet table (the data tests' inputs).
read_documents
generate_table
