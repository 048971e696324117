"""Orbax checkpoints of a run: `RUN_DIR/checkpoints/<step>/{params,train,meta}`
(`train` = optimizer state and RNG; absent in an imported step-0 checkpoint).

Saves are asynchronous and atomic: Orbax writes to a temporary folder and commits it when
complete, so an interrupted save (a kill, a full disk) is never listed as a step, the previous
checkpoints stay intact, and the temporary folder is removed when the next run opens the folder.
Kept: the newest `keep` plus the best by validation loss. Restores take an abstract target
carrying shardings, so a checkpoint written on one mesh loads onto any other (Orbax reshards).
A writing Checkpointer holds the run lock (`run_lock`) from construction to `close()`: a second
process is refused before it trains a step. Nothing but the lock file is created on disk until
the first save, and the lock file goes again on close.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from flax_gpt import storage
from flax_gpt.errors import CheckpointError, StorageError
from flax_gpt.process import progress
from flax_gpt.train.metric_keys import VAL_LOSS
from flax_gpt.train.run_lock import RunLock

CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


def damage(e: BaseException) -> str:
    """What is wrong with a checkpoint that does not read back, short: TensorStore's status and the
    array it was reading, not the page of store specification Orbax's own message carries."""
    while e.__cause__ is not None:  # Orbax wraps TensorStore's error, which says what failed
        e = e.__cause__
    text = " ".join(str(e).split())
    status = re.match(r"([A-Z_]{4,}): ", text)
    array = re.search(r'reading "([^"]+?)(?:/[^"/]*)?"', text)
    if status and array:
        detail = re.sub(r"\s*\[source locations=.*", "", text.rsplit('": ', 1)[-1])
        return f"{status.group(1)} reading {array.group(1)}: {detail}"[:200]
    return storage.error_reason(e)


class Checkpointer:
    def __init__(self, run_dir, *, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False):
        self.directory = storage.location(run_dir) / CHECKPOINTS_DIR
        self.read_only = read_only
        keep_policies = [policies.LatestN(n=max(1, keep))]
        if keep_best:
            # BestN keeps the *last* n of an ascending sort; reverse=True makes that the lowest loss.
            keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[VAL_LOSS], reverse=True, n=1,
                                                keep_checkpoints_without_metrics=False))
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed or ran out of space
            # Stored with each checkpoint (so `best` survives a restart); the preservation policy decides
            # what is kept.
            best_fn=lambda m: m[VAL_LOSS], best_mode="min",
        )
        self._manager: ocp.CheckpointManager | None = None
        self._last_saved: int | None = None
        # Process 0 speaks for a multi-host job; the others write the same run with it.
        self._lock = None if read_only or jax.process_index() != 0 else RunLock(run_dir).acquire()

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._check_metrics()
            self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return self._manager

    def _check_metrics(self) -> None:
        """Orbax reads every step's metrics file when it opens the folder, and one that is not JSON
        stops it opening at all (a traceback): named here as one line instead."""
        if storage.is_remote(self.directory) or not self.directory.is_dir():
            return
        for step_dir in sorted(Path(str(self.directory)).iterdir()):
            metrics = step_dir / "metrics" / "metrics"
            if not (step_dir.name.isdigit() and metrics.is_file()):
                continue
            try:
                json.loads(metrics.read_bytes())
            except ValueError:
                raise CheckpointError(f"checkpoint {step_dir.name} in {self.directory} is damaged (its metrics file "
                                      f"is not valid JSON); move {step_dir} into "
                                      f"{self.directory.parent / DAMAGED_DIR}/ and rerun, to continue from the "
                                      "checkpoint before it") from None

    def steps(self) -> list[int]:
        if self._manager is None and not self.directory.is_dir():
            return []
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the lowest recorded validation loss; None when no checkpoint has one."""
        scored = [(m[VAL_LOSS], s) for s in self.steps() if (m := self.manager.metrics(s)) and VAL_LOSS in m]
        return min(scored)[1] if scored else None

    def save(self, step: int, params, opt_state=None, rng=None, meta: dict | None = None,
             val_loss: float | None = None) -> None:
        """Start an asynchronous save; every process must call it (multi-host safe)."""
        self.wait()  # Orbax waits for the previous save anyway; this attributes its failure to its step
        self._check_room(step)
        items: dict[str, Any] = {"params": ocp.args.StandardSave(params)}
        extra = {} if rng is None else {"rng": jax.random.key_data(rng)}
        if opt_state is not None:
            items["train"] = ocp.args.StandardSave({"opt_state": opt_state, **extra})
        items["meta"] = ocp.args.JsonSave({"step": int(step), **(meta or {})})
        metrics = None if val_loss is None else {VAL_LOSS: float(val_loss)}
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except (OSError, ValueError) as e:  # this save, or a previous async one, failed (TensorStore: ValueError)
            raise self._save_error(step, e) from None
        self._last_saved = step

    def wait(self) -> None:
        """Block until pending saves are committed; a failed one is one StorageError line."""
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except (OSError, ValueError) as e:  # TensorStore reports write failures as ValueError
            raise self._save_error(self._last_saved, e) from None

    def _check_room(self, step: int) -> None:
        """Refuse a save that cannot fit on a local disk before writing any of it: the previous step's
        size is the next one's. (A disk that fills up during the write still fails cleanly, but
        TensorStore then reports its other pending writes to a closed event loop, on stderr.)"""
        previous = self.steps()[-1:] if jax.process_count() == 1 and not storage.is_remote(self.directory) else []
        if not previous:
            return
        need = sum(f.stat().st_size for f in Path(str(self.directory), str(previous[0])).rglob("*") if f.is_file())
        free = shutil.disk_usage(str(self.directory)).free
        if free < need:
            raise self._save_error(step, OSError(errno.ENOSPC, f"No space left on device: {free / 1e6:.1f} MB "
                                                                f"free, a checkpoint takes {need / 1e6:.1f} MB"))

    def _save_error(self, step: int | None, e: OSError) -> StorageError:
        committed = [s for s in self.steps() if s != step]
        kept = f"checkpoint {committed[-1]} is intact" if committed else "no earlier checkpoint exists"
        return StorageError(f"could not write checkpoint {step} to {self.directory} ({storage.error_reason(e)}); "
                            f"{kept}; free space or fix the folder, then rerun the same command to resume")

    def has_opt_state(self, step: int) -> bool:
        return (self.directory / str(step) / "train").exists()

    def restore(self, step: int, abstract_params, abstract_opt_state=None, abstract_rng=None) -> dict:
        """Restore one step into the given abstract targets (ShapeDtypeStructs with shardings).

        Returns {"params", "meta"} plus "opt_state" and "rng" when asked for and present.
        Raises CheckpointError when the step cannot be read."""
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract_params),
                                 "meta": ocp.args.JsonRestore()}
        with_opt = abstract_opt_state is not None and self.has_opt_state(step)
        if with_opt:
            target = {"opt_state": abstract_opt_state}
            if abstract_rng is not None:
                target["rng"] = abstract_rng
            items["train"] = ocp.args.StandardRestore(target)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for a damaged step
            error = CheckpointError(f"checkpoint {step} in {self.directory} is unreadable ({damage(e)}); pass another "
                                    "--step or retrain")
            error.reason = damage(e)
            raise error from None
        result = {"params": out["params"], "meta": dict(out["meta"])}
        if with_opt:
            result["opt_state"] = out["train"]["opt_state"]
            if abstract_rng is not None:
                result["rng"] = jax.random.wrap_key_data(out["train"]["rng"])
        return result

    def restore_latest_good(self, abstract_params, abstract_opt_state=None, abstract_rng=None,
                            warn=progress) -> dict | None:
        """Restore the newest checkpoint that reads back. A damaged one is set aside, with one line
        to `warn` (stderr): which step, why, where it was moved."""
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                return self.restore(step, abstract_params, abstract_opt_state, abstract_rng)
            except CheckpointError as e:
                aside = self._set_aside(step)
                then = ("falling back to checkpoint " + str(steps[-2 - i])) if i + 1 < len(steps) else \
                    "no readable checkpoint is left, so training starts again from step 0"
                warn(f"warning: checkpoint {step} is unreadable ({e.reason}); moved to {aside}; {then}")
        return None

    def _set_aside(self, step: int):
        """Move a damaged step out of the way (kept for inspection, never deleted), so training can
        write that step again."""
        dest = self.directory.parent / DAMAGED_DIR / str(step)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.parent / f"{step}.{len(list(dest.parent.iterdir()))}"
            storage.move(self.directory / str(step), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"flax_gpt.set_aside.{step}")
        self.manager.reload()
        return dest

    def close(self) -> None:
        try:
            if self._manager is not None:
                try:
                    self.wait()
                finally:
                    self._manager.close()
                    self._manager = None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
