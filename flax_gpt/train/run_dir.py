"""The run directory (**contract**): `config.yaml`, `checkpoints/<step>/`, `metrics.jsonl`, `tb/`,
`wandb_id` (with W&B logging), `profile/` (with train.profile_steps), plus the ownership marker
`.flax_gpt.json`; and the run's shards, found through its config. `RunDir` is the one way to them:
every verb, the report and the export read and write a run's files through it.

A run directory changes only when a step was trained: `RunDir.check` inspects it before anything
runs and writes nothing; `RunDir.commit_config` writes the marker and the resolved config once the
first step has been trained. So a failed start leaves the directory exactly as it was, and a
directory that never finished a checkpointed step accepts a corrected config. While a process
trains in it, that process holds the run lock (`run_lock`; its file is the one thing there before
the marker, and it is no content of the folder): a second training of the same directory is refused.

Only the marker makes a folder a run directory: a folder of the user's that holds a config.yaml
and a checkpoints/ of its own is refused, never written into.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from flax_gpt import storage
from flax_gpt.config import RESULT, Config, MeshConfig, ModelConfig
from flax_gpt.config_files import config_from_yaml, config_yaml
from flax_gpt.data.shards import MANIFEST_NAME, read_manifest
from flax_gpt.errors import CheckpointError, ConfigError, OutputError, UserError
from flax_gpt.model.family import abstract_params
from flax_gpt.sharding import abstract_on, make_mesh, param_shardings
from flax_gpt.train.checkpoint import CHECKPOINTS_DIR, Checkpointer
from flax_gpt.train.host_memory import GiB, check_host_memory, local_bytes, n_params, on_cpu
from flax_gpt.train.metrics import METRICS_FILE, MetricsWriter, check_wandb
from flax_gpt.train.optim import needs_run_length
from flax_gpt.train.run_lock import check_free

CONFIG_FILE = "config.yaml"
PROFILE_DIR = "profile"
_RUN_LENGTH = ("train.steps", "train.epochs")


class RunDir:
    """A run directory at a local path or `gs://` URL. `path`: where it is (`storage.location`);
    `shown`: the location as given, for messages."""

    def __init__(self, path):
        self.shown = str(path)
        self.path = storage.location(path)

    @property
    def checkpoints(self):
        """The checkpoint folder (Orbax's; read and written through `checkpointer`)."""
        return self.path / CHECKPOINTS_DIR

    @property
    def metrics_file(self):
        return self.path / METRICS_FILE

    def has_config(self) -> bool:
        return (self.path / CONFIG_FILE).exists()

    def config(self) -> Config:
        """The run's resolved config (`config.yaml`)."""
        path = self.path / CONFIG_FILE
        if not path.exists():
            hint = "" if self.path.is_dir() else " (the folder does not exist)"
            raise ConfigError(f"{self.shown} is not a run directory (no {CONFIG_FILE}){hint}; pass the "
                              "train.run_dir of a run")
        return config_from_yaml(path.read_text(), str(path))

    def check(self, cfg: Config) -> bool:
        """Check, without writing anything, that `cfg` may train here. True when it resumes trained
        checkpoints. Raises naming the problem (foreign folder, changed setting...)."""
        check_wandb(cfg.train)  # the run's metrics writer will need it
        storage.check_output(self.shown, "run", reuse=True)
        storage.check_writable(self.path, "train.run_dir")
        if jax.process_index() == 0:  # the process that will hold the lock; refused before any work
            check_free(self.shown)
        if storage.folder_kind(self.path) != "run":
            return False
        if storage.marker_of(self.path).get("incomplete"):
            raise OutputError(f"run directory {self.shown} is an import-hf whose upload was cut short; run "
                              "the same import-hf again to finish it")
        if self.checkpoints.exists():
            storage.check_writable(self.checkpoints, "the checkpoint folder")
        ckpt = self.checkpointer(read_only=True)
        try:
            steps, trained = ckpt.steps(), _trained_steps(ckpt)
        finally:
            ckpt.close()
        if not steps:
            return False
        if not self.has_config():
            raise ConfigError(f"run directory {self.path} has checkpoints but no {CONFIG_FILE}; restore the file "
                              "or use a new train.run_dir")
        old = self.config()
        if trained:
            check_resume_compatible(old, cfg)
        else:  # only imported weights: a corrected config is welcome, as long as the weights still fit
            check_same_architecture(cfg.model, old.model, str(self.path))
        return bool(trained)

    def commit_config(self, cfg: Config) -> None:
        """Mark the folder as a run of ours and write the resolved config (process 0; atomic), the
        marker first: a kill in between leaves a run of ours without config, which the next start
        completes. The folder may be a staging one the run directory is built in (import-hf)."""
        if jax.process_index() != 0:
            return
        storage.mark(self.path, "run")
        storage.write_atomic(self.path / CONFIG_FILE, config_yaml(cfg))

    def checkpointer(self, **options) -> Checkpointer:
        """The run's checkpoints (`Checkpointer`'s options); a writing one holds the run lock."""
        return Checkpointer(self.shown, **options)

    def load_params(self, step: int | str | None = None, *, mesh=None) -> tuple[Config, dict, int, dict]:
        """(config, params, step, meta) of a checkpoint (`step`: N, "latest" or "best"; default the
        latest), placed on `mesh` (default: all devices of this process in a data-parallel mesh,
        parameters replicated or sharded by the rules)."""
        cfg = self.config()
        ckpt = self.checkpointer(read_only=True)
        try:
            chosen = _resolve_step(ckpt, step)
            mesh = mesh or make_mesh(MeshConfig())
            boxed = abstract_params(cfg.model, boxed=True)
            target = abstract_on(nn.unbox(boxed), param_shardings(mesh, boxed))
            if on_cpu(target):
                need = local_bytes(target)
                check_host_memory(need, f"parameters {need / GiB:.1f}", f"loading checkpoint {chosen} of "
                                  f"{self.shown} ({n_params(target) / 1e9:.2f}B parameters)",
                                  fix="use a host with more memory")
            out = ckpt.restore(chosen, target)
        finally:
            ckpt.close()
        return cfg, out["params"], chosen, out["meta"]

    def metrics(self) -> list[dict[str, Any]]:
        """All records of `metrics.jsonl` in file order ([] when there is no file).

        A final line cut short by a crash mid-write is skipped; a damaged line elsewhere is an error.
        """
        path = self.metrics_file
        if not path.exists():
            return []
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        records = []
        for i, ln in enumerate(lines):
            try:
                records.append(json.loads(ln))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise ValueError(f"{path}: line {i + 1} is not valid JSON; remove or repair it") from None
        return records

    def metrics_writer(self, **options) -> MetricsWriter:
        """The writer of `metrics.jsonl`, `tb/` and the W&B mirror (`MetricsWriter`'s options)."""
        return MetricsWriter(self.path, **options)

    def publish_trace(self, trace: Path, *, keep: bool = True) -> None:
        """Move a finished profiler trace (a local folder) into `profile/`, next to earlier ones, and
        remove the local folder. `keep=False`: the folder is not the run's yet (no step was
        trained), so the trace is dropped rather than written into a folder without its marker."""
        if not trace.is_dir():
            return
        try:
            if keep and any(p.is_file() for p in trace.rglob("*")):
                dest = self.path / PROFILE_DIR
                if storage.is_remote(self.path):
                    storage.upload_folder(trace, dest)
                else:
                    shutil.copytree(trace, str(dest), dirs_exist_ok=True)
        finally:
            shutil.rmtree(trace, ignore_errors=True)

    def shards(self, cfg: Config):
        """The run's shards folder, or None when it is not here. A relative `data.shards_dir` is
        relative to where training ran; when that is not here, it is recovered from this folder
        (whose train.run_dir shares that base)."""
        candidates = [storage.location(cfg.data.shards_dir)]
        shards, rel = Path(cfg.data.shards_dir), Path(cfg.train.run_dir)
        if not storage.is_remote(self.path) and not storage.is_remote(cfg.data.shards_dir) \
                and not shards.is_absolute() and not rel.is_absolute():
            parts = Path(str(self.path)).resolve().parts
            if parts[-len(rel.parts):] == rel.parts:
                candidates.append(storage.location(Path(*parts[: len(parts) - len(rel.parts)]) / shards))
        return next((c for c in candidates if (c / MANIFEST_NAME).exists()), None)

    def manifest(self, cfg: Config) -> dict | None:
        """The manifest of the run's shards, or None when they are not here (or unreadable)."""
        shards = self.shards(cfg)
        if shards is None:
            return None
        try:
            return read_manifest(shards)
        except UserError:
            return None


def _trained_steps(ckpt: Checkpointer) -> list[int]:
    """Checkpointed steps that carry an optimizer state (an imported step 0 holds weights only)."""
    return [s for s in ckpt.steps() if ckpt.has_opt_state(s)]


def _resolve_step(ckpt: Checkpointer, step: int | str | None) -> int:
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


def check_same_architecture(want: ModelConfig, got: ModelConfig, source: str) -> None:
    wanted, found = want.architecture(), got.architecture()
    for k in wanted:
        if wanted[k] != found[k]:
            raise ConfigError(f"{source} has model.{k}={getattr(got, k)} but the config says "
                              f"model.{k}={getattr(want, k)}; set model.preset/{k} to match it")
