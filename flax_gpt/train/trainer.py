"""The training loop: step, metrics fetched a step late, preemption. The state, its shardings and
the jitted step come from `StateBuilder`; the periodic actions (evaluation, checkpoints, the
profiler window) are hooks (`hooks.py`); the math is in `step.py`. This file only runs the steps.
"""

from __future__ import annotations

import os
import signal
import time

import jax
from jax.experimental import multihost_utils

from flax_gpt.config import Config
from flax_gpt.data.loader import TrainLoader
from flax_gpt.process import wait_interruptibly
from flax_gpt.train.evaluate import Evaluator
from flax_gpt.train.hooks import build_hooks
from flax_gpt.train.loop import Loop
from flax_gpt.train.metric_keys import STEP
from flax_gpt.train.run_dir import RunDir
from flax_gpt.train.state import StateBuilder


class Trainer:
    """Trains `builder`'s state for `builder.total_steps` steps in `cfg.train.run_dir`;
    `on_record` gets each metrics record as it is written (train and eval lines)."""

    def __init__(self, cfg: Config, builder: StateBuilder, *, say=print, on_record=None):
        self.cfg, self.builder, self.say, self.on_record = cfg, builder, say, on_record
        # (step, params, meta) of the last step once `fit` has trained to the end: what its last
        # checkpoint holds, still in device memory, for the export and samples that follow.
        self.final: tuple[int, dict, dict] | None = None
        self.run_dir = RunDir(cfg.train.run_dir)
        self.evaluator = Evaluator(cfg.model, builder.mesh, document_mask=cfg.data.document_mask,
                                   batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                                   packing=cfg.data.packing)

    def fit(self, train_rows, val_rows, *, final_eval: bool = True) -> dict:
        cfg, total_steps = self.cfg, self.builder.total_steps
        ckpt = self.run_dir.checkpointer(keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                                         async_save=cfg.checkpoint.async_save)
        state = self.builder.restore_or_init(ckpt, say=self.say)
        start = int(jax.device_get(state.step))
        if start >= total_steps:
            ckpt.close()
            self.say(f"already trained to step {start} (train.steps={total_steps}); raise train.steps to go further")
            return {STEP: start, "already_trained": True}
        loop = Loop(cfg, ckpt, state, start, total_steps, on_record=self.on_record)
        if val_rows is None or val_rows.num_rows == 0:
            val_rows = None
            if final_eval:
                self.say("no validation split (data.val_fraction=0, or too few documents for one row of "
                         "data.seq_len): training without evaluation")
        hooks = build_hooks(cfg, self.evaluator, val_rows, final_eval=final_eval)
        loader = TrainLoader(train_rows, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                             document_mask=cfg.data.document_mask, packing=cfg.data.packing,
                             sharding=self.builder.batch_sh, prefetch=cfg.data.prefetch)
        stop = _PreemptionFlag()
        try:
            with stop:
                for s, batch in loader.iterate(start, total_steps):
                    for hook in hooks:
                        hook.before(s, loop)
                    if s == start:  # the first call compiles the step: minutes for a large model
                        loop.bar.write("compiling the train step; training starts when it is done")
                        t_compile = time.perf_counter()
                        loop.state, metrics = wait_interruptibly(self.builder.step_fn, loop.state, batch)
                        loop.bar.write(f"compiled the train step in {time.perf_counter() - t_compile:.1f} s")
                    else:
                        loop.state, metrics = self.builder.step_fn(loop.state, batch)
                    loop.push(s, metrics)
                    done = s + 1
                    preempted = stop.requested(done)
                    for hook in hooks:
                        if hook.due(done, total_steps):
                            hook.run(done, loop)
                    if preempted:
                        loop.flush()  # never save a step whose loss was not checked
                        if loop.last_saved != done:
                            loop.save(done)
                        ckpt.wait()
                        loop.bar.write(f"preempted: checkpoint {done} written; run the same command to resume")
                        return {STEP: done, "preempted": True}
                loop.flush()
            done = int(jax.device_get(loop.state.step))
            for hook in hooks:
                hook.at_end(done, loop)
            ckpt.wait()
            self.final = (done, loop.state.params, loop.meta(done))
        finally:
            for hook in hooks:
                hook.close(loop)
            loop.close()
        return {STEP: done, **(loop.last_eval or {}), **loop.summary()}


class _PreemptionFlag:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and exit 0.

    Multi-host, every process must stop at the same step: JAX's coordination service delivers the
    preemption notice and `reached_preemption_sync_point` agrees on the step.
    """

    def __init__(self):
        self._flag = False
        self._old = {}

    def __enter__(self):
        if jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handler(self, signum, frame):
        self._flag = True
        # Said at once: the step in flight (the first one compiles) can take minutes to finish.
        os.write(2, f"{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint\n".encode())

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # noqa: BLE001 - the runtime was started without a preemption service
                return False
        return self._flag

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
