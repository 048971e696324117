"""The run directory (**contract**): `config.yaml`, `checkpoints/<step>/`, `metrics.jsonl`, `tb/`,
`wandb_id` (with W&B logging), `profile/` (with train.profile_steps), plus the ownership marker
`.flax_gpt.json`.

A run directory changes only when a step was trained: `check_run_dir` inspects it before anything
runs and writes nothing; `commit_config` writes the marker and the resolved config once the first
step has been trained. So a failed start leaves the directory exactly as it was, and a directory
that never finished a checkpointed step accepts a corrected config. While a process trains in it,
that process holds the run lock (`run_lock`; its file is the one thing there before the marker,
and it is no content of the folder): a second training of the same directory is refused.

Only the marker makes a folder a run directory: a folder of the user's that holds a config.yaml
and a checkpoints/ of its own is refused, never written into.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax

from flax_gpt import storage
from flax_gpt.config import RESULT, Config, ModelConfig
from flax_gpt.config_files import config_from_yaml, config_yaml
from flax_gpt.data.shards import MANIFEST_NAME, read_manifest
from flax_gpt.errors import CheckpointError, ConfigError, OutputError, UserError
from flax_gpt.train.checkpoint import Checkpointer
from flax_gpt.train.metrics import check_wandb
from flax_gpt.train.optim import needs_run_length
from flax_gpt.train.run_lock import check_free

CONFIG_FILE = "config.yaml"
PROFILE_DIR = "profile"
_RUN_LENGTH = ("train.steps", "train.epochs")


def read_run_config(run_dir) -> Config:
    path = storage.location(run_dir) / CONFIG_FILE
    if not path.exists():
        hint = "" if storage.location(run_dir).is_dir() else " (the folder does not exist)"
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE}){hint}; pass the train.run_dir "
                          "of a run")
    return config_from_yaml(path.read_text(), str(path))


def check_resume_compatible(old: Config, new: Config) -> None:
    """A run directory may only be continued by a config that computes the same thing: every
    setting declared `effect=RESULT` must match (and the run length, when the schedule uses it)."""
    old_values = {name: value for name, _, _, value in old.items()}
    for name, _, f, value in new.items():
        result = f.metadata["effect"] == RESULT or (name in _RUN_LENGTH and needs_run_length(new.optim))
        if result and old_values[name] != value:
            raise ConfigError(
                f"run directory {new.train.run_dir} was trained with {name}={old_values[name]!r} but the "
                f"config now says {value!r}; use a new train.run_dir or set {name}={old_values[name]!r}")


def trained_steps(ckpt: Checkpointer) -> list[int]:
    """Checkpointed steps that carry an optimizer state (an imported step 0 holds weights only)."""
    return [s for s in ckpt.steps() if ckpt.has_opt_state(s)]


def check_run_dir(cfg: Config) -> bool:
    """Check, without writing anything, that `cfg` may train in its run directory. True when it
    resumes trained checkpoints. Raises naming the problem (foreign folder, changed setting...)."""
    check_wandb(cfg.train)  # the run's metrics writer will need it
    run_dir = storage.location(cfg.train.run_dir)
    storage.check_output(cfg.train.run_dir, "run", reuse=True)
    storage.check_writable(run_dir, "train.run_dir")
    if jax.process_index() == 0:  # the process that will hold the lock; refused before any work
        check_free(cfg.train.run_dir)
    if storage.folder_kind(run_dir) != "run":
        return False
    if storage.marker_of(run_dir).get("incomplete"):
        raise OutputError(f"run directory {cfg.train.run_dir} is an import-hf whose upload was cut short; run "
                          "the same import-hf again to finish it")
    if (run_dir / "checkpoints").exists():
        storage.check_writable(run_dir / "checkpoints", "the checkpoint folder")
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        steps, trained = ckpt.steps(), trained_steps(ckpt)
    finally:
        ckpt.close()
    if not steps:
        return False
    if not (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run directory {run_dir} has checkpoints but no {CONFIG_FILE}; restore the file "
                          "or use a new train.run_dir")
    old = read_run_config(run_dir)
    if trained:
        check_resume_compatible(old, cfg)
    else:  # only imported weights: a corrected config is welcome, as long as the weights still fit
        check_same_architecture(cfg.model, old.model, str(run_dir))
    return bool(trained)


def commit_config(cfg: Config, folder=None) -> None:
    """Mark the run directory as ours and write the resolved config (process 0; atomic), the marker
    first: a kill in between leaves a run of ours without config, which the next start completes.
    `folder`: where the run directory is being built, when not in place (import-hf's staging)."""
    if jax.process_index() != 0:
        return
    run_dir = storage.location(folder or cfg.train.run_dir)
    storage.mark(run_dir, "run")
    storage.write_atomic(run_dir / CONFIG_FILE, config_yaml(cfg))


def publish_trace(trace: Path, run_dir, *, keep: bool = True) -> None:
    """Move a finished profiler trace (a local folder) into RUN_DIR/profile, next to earlier ones,
    and remove the local folder. `keep=False`: the run directory is not the run's yet (no step was
    trained), so the trace is dropped rather than written into a folder without its marker."""
    if not trace.is_dir():
        return
    try:
        if keep and any(p.is_file() for p in trace.rglob("*")):
            dest = storage.location(run_dir) / PROFILE_DIR
            if storage.is_remote(run_dir):
                storage.upload_folder(trace, dest)
            else:
                shutil.copytree(trace, str(dest), dirs_exist_ok=True)
    finally:
        shutil.rmtree(trace, ignore_errors=True)


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
    if isinstance(step, str) and not step.isdigit():
        raise ConfigError(f"--step {step!r} is not a step number, 'latest' or 'best'; available steps: {steps}")
    if int(step) not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {ckpt.directory}; available: {steps}")
    return int(step)


def find_shards(run_dir, cfg: Config):
    """The run's shards folder. A relative `data.shards_dir` is relative to where training ran;
    when that is not here, recover it from the run directory (whose train.run_dir shares that base)."""
    candidates = [storage.location(cfg.data.shards_dir)]
    shards, rel = Path(cfg.data.shards_dir), Path(cfg.train.run_dir)
    if not storage.is_remote(run_dir) and not storage.is_remote(cfg.data.shards_dir) and not shards.is_absolute() \
            and not rel.is_absolute():
        parts = Path(run_dir).resolve().parts
        if parts[-len(rel.parts):] == rel.parts:
            candidates.append(storage.location(Path(*parts[: len(parts) - len(rel.parts)]) / shards))
    return next((c for c in candidates if (c / MANIFEST_NAME).exists()), None)


def run_manifest(run_dir, cfg: Config) -> dict | None:
    """The manifest of the run's shards, or None when they are not here (or unreadable)."""
    shards = find_shards(run_dir, cfg)
    if shards is None:
        return None
    try:
        return read_manifest(shards)
    except UserError:
        return None


def check_same_architecture(want: ModelConfig, got: ModelConfig, source: str) -> None:
    wanted, found = want.architecture(), got.architecture()
    for k in wanted:
        if wanted[k] != found[k]:
            raise ConfigError(f"{source} has model.{k}={getattr(got, k)} but the config says "
                              f"model.{k}={getattr(want, k)}; set model.preset/{k} to match it")
