"""What the verbs do, end to end: train (prepare -> fit -> export -> samples), eval, export.

The CLI and the notebook API (`flax_gpt.api`) both call these; they hold no math of their own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from flax_gpt.config import Config


def ensure_shards(cfg: Config, *, overwrite: bool = False) -> dict:
    """Prepare the configured shards if needed (process 0 first; others reuse or make their own)."""
    from flax_gpt.data import prepare_shards

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        manifest = prepare_shards(cfg.data, overwrite=overwrite) if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("flax_gpt.prepare")
        # On a shared filesystem this reuses process 0's shards; on local disks it makes them.
        return manifest or prepare_shards(cfg.data)
    return prepare_shards(cfg.data, overwrite=overwrite)


def open_splits(cfg: Config, *, verify: bool = False):
    from flax_gpt.data import open_split

    kw = dict(vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len, verify=verify)
    return open_split(cfg.data.shards_dir, "train", **kw), open_split(cfg.data.shards_dir, "val", **kw)


def train(cfg: Config, *, overwrite_data: bool = False, say=print) -> dict:
    from flax_gpt.run import prepare_run_dir
    from flax_gpt.trainer import Trainer, total_steps

    if cfg.train.export_dir:  # fail now, not after training, if the export cannot be checked
        from flax_gpt.hf_io import require_torch

        require_torch()
    resuming = prepare_run_dir(cfg)
    ensure_shards(cfg, overwrite=overwrite_data)
    train_rows, val_rows = open_splits(cfg)
    trainer = Trainer(cfg, say=say)  # mesh and divisibility errors surface here, before compiling
    steps = total_steps(cfg, train_rows.num_rows)
    if jax.process_index() == 0:
        say(f"{'resuming' if resuming else 'training'} {cfg.model.preset} ({cfg.model.n_layer} layers, "
            f"{cfg.model.n_embd} wide) for {steps} steps of {cfg.train.batch_size}x{cfg.data.seq_len} tokens "
            f"on {jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(trainer.mesh.shape)}")
    result = trainer.fit(train_rows, val_rows, steps)
    if result.get("preempted"):
        return result
    if cfg.train.export_dir:
        out, diff = export_run(cfg.train.run_dir, cfg.train.export_dir, overwrite=True)
        result["export_dir"] = str(out)
        say(f"exported to {out} (transformers reload checked, max logit diff {diff:.1e})")
    if cfg.train.sample_prompts and jax.process_index() == 0:
        from flax_gpt.generate import sample_run

        texts = sample_run(cfg.train.run_dir, list(cfg.train.sample_prompts),
                           max_new_tokens=cfg.train.sample_max_new_tokens, seed=cfg.train.seed)
        for prompt, text in zip(cfg.train.sample_prompts, texts):
            say(f"\n--- sample: {prompt!r}\n{text}")
    return result


def evaluate_run(run_dir: str | Path, *, step=None) -> dict:
    """`flax-gpt eval`: {step, val_loss, perplexity, tokens} over the whole validation split."""
    from flax_gpt.run import load_params, read_run_config
    from flax_gpt.trainer import Trainer

    cfg = read_run_config(run_dir)
    trainer = Trainer(cfg.replace(mesh={"data": -1, "fsdp": 1, "tensor": 1}))
    _, params, chosen, _ = load_params(run_dir, step, mesh=trainer.mesh)
    _, val_rows = open_splits(cfg)
    return {"step": chosen, **trainer.evaluate(params, val_rows)}


def export_run(run_dir: str | Path, out: str | Path, *, step=None, dtype: str = "float32",
               overwrite: bool = False) -> tuple[Path, float]:
    """`flax-gpt export`: HF folder with model card; reloaded with transformers and compared."""
    from flax_gpt.hf_io import check_export_target, export_hf, verify_export
    from flax_gpt.model import GPT2
    from flax_gpt.publish import model_card
    from flax_gpt.run import load_params

    check_export_target(Path(out), overwrite)  # fail before loading anything
    cfg, params, chosen, meta = load_params(run_dir, step)
    host = jax.device_get(params)
    if dtype == "bfloat16":  # compare against exactly the weights transformers will read
        import ml_dtypes

        host = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), host)
    fp32 = dataclasses.replace(cfg.model, dtype="float32")
    apply = jax.jit(lambda p, t: GPT2(fp32).apply({"params": p}, t))
    diffs = []

    def check(folder):
        diffs.append(verify_export(folder, lambda t: apply(host, t), cfg.model, atol=2e-3))

    extra = {"README.md": model_card(run_dir, cfg, chosen, meta),
             "training_config.json": json.dumps(cfg.to_dict(), indent=2)}
    path = export_hf(host, cfg.model, out, tokenizer=cfg.data.tokenizer, dtype=dtype, overwrite=overwrite,
                     extra_files=extra, check=check)
    return path, diffs[0]
