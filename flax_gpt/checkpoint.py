"""Orbax checkpoints of a run: `RUN_DIR/checkpoints/<step>/{params,train,meta}`
(`train` = optimizer state and RNG; absent in an imported step-0 checkpoint).

Saves are asynchronous and atomic (Orbax writes to a temporary folder and renames it on commit, so
an interrupted save is never listed as a step). Kept: the newest `keep` plus the best by
validation loss. Restores take an abstract target carrying shardings, so a checkpoint written on
one mesh loads onto any other (Orbax reshards on read).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected."""


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        keep_policies = [policies.LatestN(n=max(1, keep))]
        if keep_best:
            # BestN keeps the *last* n of an ascending sort; reverse=True makes that the lowest loss.
            keep_policies.append(policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(read=True))

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, params, opt_state=None, rng=None, meta: dict | None = None,
             val_loss: float | None = None) -> None:
        """Start an asynchronous save; every process must call it (multi-host safe)."""
        items: dict[str, Any] = {"params": ocp.args.StandardSave(params)}
        extra = {} if rng is None else {"rng": jax.random.key_data(rng)}
        if opt_state is not None:
            items["train"] = ocp.args.StandardSave({"opt_state": opt_state, **extra})
        items["meta"] = ocp.args.JsonSave({"step": int(step), **(meta or {})})
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def has_opt_state(self, step: int) -> bool:
        return (self.directory / str(step) / "train").is_dir()

    def restore(self, step: int, abstract_params, abstract_opt_state=None, abstract_rng=None) -> dict:
        """Restore one step into the given abstract targets (ShapeDtypeStructs with shardings).

        Returns {"params", "meta"} plus "opt_state" and "rng" when asked for and present.
        """
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract_params),
                                 "meta": ocp.args.JsonRestore()}
        with_opt = abstract_opt_state is not None and self.has_opt_state(step)
        if with_opt:
            target = {"opt_state": abstract_opt_state}
            if abstract_rng is not None:
                target["rng"] = abstract_rng
            items["train"] = ocp.args.StandardRestore(target)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        result = {"params": out["params"], "meta": dict(out["meta"])}
        if with_opt:
            result["opt_state"] = out["train"]["opt_state"]
            if abstract_rng is not None:
                result["rng"] = jax.random.wrap_key_data(out["train"]["rng"])
        return result

    def restore_latest_good(self, abstract_params, abstract_opt_state=None, abstract_rng=None,
                            say=print) -> dict | None:
        """Restore the newest checkpoint that reads back; a damaged one is skipped, and said so."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, abstract_params, abstract_opt_state, abstract_rng)
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                aside = self._set_aside(step)
                say(f"warning: checkpoint {step} is unreadable ({type(e).__name__}); moved to {aside} and "
                    "falling back to the previous one")
        return None

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step out of the way (kept for inspection, never deleted), so training can
        write that step again."""
        dest = self.directory.parent / "damaged_checkpoints" / str(step)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(f"{step}.{len(list(dest.parent.iterdir()))}")
            (self.directory / str(step)).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"flax_gpt.set_aside.{step}")
        self.manager.reload()
        return dest

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
