"""The run directory (**contract**): `config.yaml`, `checkpoints/<step>/`, `metrics.jsonl`, `tb/`.

Everything that opens an existing run (eval, export, generate, report, resume) goes through here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import yaml

from flax_gpt.checkpoint import CheckpointError, Checkpointer
from flax_gpt.config import Config, ConfigError, MeshConfig, ModelConfig, build_config, save_config

CONFIG_FILE = "config.yaml"

# Settings a resumed run may change: how it runs, not what it computes.
_RESUMABLE = {
    "model": {"dtype", "remat", "attention", "init_from"},
    "data": {"prefetch", "shards_dir"},
    "train": {"steps", "epochs", "eval_every", "eval_batch_size", "log_every", "progress", "export_dir",
              "sample_prompts", "sample_max_new_tokens", "grad_accum", "run_dir"},
    "mesh": {"data", "fsdp", "tensor"},
    "checkpoint": {"every", "keep", "keep_best", "async_save"},
    "optim": set(),
}


def read_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the train.run_dir of a run")
    try:
        return build_config(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML; restore it or start a new run directory") from None


def check_resume_compatible(old: Config, new: Config) -> None:
    """A run directory may only be continued by a config that computes the same thing."""
    for section, allowed in _RESUMABLE.items():
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            if f.name in allowed:
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                raise ConfigError(
                    f"run directory {new.train.run_dir} was trained with {section}.{f.name}={va!r} but the "
                    f"config now says {vb!r}; use a new train.run_dir or set {section}.{f.name}={va!r}"
                )


def prepare_run_dir(cfg: Config) -> bool:
    """Create or check the run directory and write the resolved config. True when resuming."""
    run_dir = Path(cfg.train.run_dir)
    existing = run_dir / CONFIG_FILE
    resuming = existing.is_file()
    if resuming:
        check_resume_compatible(read_run_config(run_dir), cfg)
    if jax.process_index() == 0:
        save_config(cfg, existing)
    return resuming


def resolve_step(ckpt: Checkpointer, step: int | str | None) -> int:
    steps = ckpt.steps()
    if not steps:
        raise CheckpointError(f"no checkpoints in {ckpt.directory}; train first or import weights with import-hf")
    if step is None or step == "latest":
        return steps[-1]
    if step == "best":
        best = ckpt.best_step()
        if best is None:
            raise CheckpointError("no checkpoint has a validation loss yet; pass --step N or evaluate during training")
        return best
    step = int(step)
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {ckpt.directory}; available: {steps}")
    return step


def load_params(run_dir: str | Path, step: int | str | None = None, *, mesh=None,
                model_overrides: dict | None = None) -> tuple[Config, dict, int, dict]:
    """(config, params, step, meta) of a run's checkpoint, placed on `mesh` (default: all devices
    of this process in a data-parallel mesh, parameters replicated or sharded by the rules)."""
    from flax_gpt.model import abstract_params
    from flax_gpt.sharding import make_mesh, param_shardings

    cfg = read_run_config(run_dir)
    if model_overrides:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_overrides))
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        chosen = resolve_step(ckpt, step)
        mesh = mesh or make_mesh(MeshConfig())
        boxed = abstract_params(cfg.model, boxed=True)
        shardings = param_shardings(mesh, boxed)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params(cfg.model), shardings)
        out = ckpt.restore(chosen, target)
    finally:
        ckpt.close()
    return cfg, out["params"], chosen, out["meta"]


def import_hf_to_run(src: str, run_dir: str | Path, *, base: Config | None = None) -> tuple[Config, int]:
    """`flax-gpt import-hf`: an HF folder or Hub id -> a run directory with a step-0 checkpoint."""
    from flax_gpt.hf_io import load_hf
    from flax_gpt.model import abstract_params

    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints; import into a new directory")
    base = base or Config()
    model_cfg, params = load_hf(src, abstract_params, dtype=base.model.dtype, pad_vocab_to=base.model.pad_vocab_to)
    cfg = base.replace(model=dataclasses.asdict(model_cfg), train={"run_dir": str(run_dir)},
                       data={"seq_len": min(base.data.seq_len, model_cfg.n_positions)})
    cfg = cfg.replace(model={"init_from": src})
    cfg.validate()
    save_config(cfg, run_dir / CONFIG_FILE)
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        ckpt.save(0, params, meta={"source": src})
        ckpt.wait()
    finally:
        ckpt.close()
    return cfg, sum(v.size for v in jax.tree.leaves(params))


def check_same_architecture(want: ModelConfig, got: ModelConfig, source: str) -> None:
    for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner"):
        if getattr(want, k) != getattr(got, k):
            raise ConfigError(f"model.init_from={source} has {k}={getattr(got, k)} but the config says "
                              f"model.{k}={getattr(want, k)}; set model.preset/{k} to match the checkpoint")
