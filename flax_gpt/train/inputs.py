"""A run's data: the configured shards, prepared once per job (process 0 first), opened against
the model (vocab) and the config (seq_len)."""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils

from flax_gpt.config import Config
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.shards import TokenRows, open_split


def ensure_shards(cfg: Config, *, overwrite: bool = False) -> dict:
    """Prepare the configured shards if needed (process 0 first; others reuse or make their own)."""
    if jax.process_count() > 1:
        manifest = prepare_shards(cfg.data, overwrite=overwrite) if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("flax_gpt.prepare")
        # On a shared filesystem this reuses process 0's shards; on local disks it makes them.
        return manifest or prepare_shards(cfg.data)
    return prepare_shards(cfg.data, overwrite=overwrite)


def open_splits(cfg: Config, *, verify: bool = False) -> tuple[TokenRows, TokenRows]:
    kw = dict(vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len, verify=verify)
    return open_split(cfg.data.shards_dir, "train", **kw), open_split(cfg.data.shards_dir, "val", **kw)
