"""The training loop: step, metrics fetched a step late, evaluation and checkpoint cadence,
preemption, profiling. The state, its shardings and the jitted step come from `StateBuilder`;
evaluation is the `Evaluator`; the math is in `step.py`. This file only decides what runs when.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from flax_gpt import storage
from flax_gpt.config import Config, profile_range
from flax_gpt.data.loader import TrainLoader
from flax_gpt.errors import TrainError
from flax_gpt.model.family import flops_per_token
from flax_gpt.process import wait_interruptibly
from flax_gpt.train.checkpoint import Checkpointer
from flax_gpt.train.evaluate import Evaluator
from flax_gpt.train.metrics import MetricsWriter, ProgressBar, Throughput
from flax_gpt.train.run_dir import commit_config, publish_trace
from flax_gpt.train.state import StateBuilder


class Trainer:
    """Trains `builder`'s state for `builder.total_steps` steps in `cfg.train.run_dir`;
    `on_record` gets each metrics record as it is written (train and eval lines)."""

    def __init__(self, cfg: Config, builder: StateBuilder, *, say=print, on_record=None):
        self.cfg, self.builder, self.say, self.on_record = cfg, builder, say, on_record
        self.run_dir = cfg.train.run_dir
        self.evaluator = Evaluator(cfg.model, builder.mesh, document_mask=cfg.data.document_mask,
                                   batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                                   packing=cfg.data.packing)

    def fit(self, train_rows, val_rows, *, final_eval: bool = True) -> dict:
        cfg, total_steps = self.cfg, self.builder.total_steps
        is_main = jax.process_index() == 0
        ckpt = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                            async_save=cfg.checkpoint.async_save)
        state = self.builder.restore_or_init(ckpt, say=self.say)
        start = int(jax.device_get(state.step))
        if start >= total_steps:
            ckpt.close()
            self.say(f"already trained to step {start} (train.steps={total_steps}); raise train.steps to go further")
            return {"step": start, "already_trained": True}
        writer = MetricsWriter(self.run_dir, enabled=is_main, purge_step=start or None, on_record=self.on_record,
                               config=cfg)
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        thr = Throughput(tokens_per_step=tokens_per_step, n_devices=jax.device_count(),
                         flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
                         device_kind=jax.devices()[0].device_kind)
        bar = ProgressBar(total_steps, start, disable=not (is_main and cfg.train.progress))
        profile = profile_range(cfg.train.profile_steps) if cfg.train.profile_steps else None
        profile_dir = None
        has_val = val_rows is not None and val_rows.num_rows > 0
        if final_eval and not has_val:
            self.say("no validation split (data.val_fraction=0, or too few documents for one row of "
                     "data.seq_len): training without evaluation")
        stop = _PreemptionFlag()
        last_eval: dict | None = None
        last_saved = start if start in ckpt.steps() else None
        committed = False
        pending = None  # (step, device metrics): fetched one step late so dispatch stays async
        t_prev = None
        step_times: list[float] = []

        def flush():
            nonlocal pending, t_prev, committed
            if pending is None:
                return
            s, m = pending
            pending = None
            m = jax.device_get(m)
            now = time.perf_counter()
            if not bool(m["finite"]):
                raise TrainError(
                    f"loss became non-finite at step {s + 1} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); the update was skipped and nothing was saved; the latest "
                    f"checkpoint is {ckpt.steps()[-1] if ckpt.steps() else 'none'}; lower optim.learning_rate")
            if not committed:  # the first trained step: from now on the run directory is this run's
                commit_config(cfg)
                committed = True
            rec = {"step": s + 1, "loss": float(m["loss"]), "lr": float(m["lr"]),
                   "grad_norm": float(m["grad_norm"]), "tokens_seen": (s + 1) * tokens_per_step}
            if t_prev is not None:  # the first fetched step includes compilation: not timed
                dt = now - t_prev
                step_times.append(dt)
                thr.update(dt)
                rec.update({k: v for k, v in thr.summary([dt]).items() if v is not None})
            t_prev = now
            if (s + 1) % cfg.train.log_every == 0 or s + 1 == total_steps:
                writer.write(rec)
            bar.update(s + 1, loss=rec["loss"], tokens_per_sec=rec.get("tokens_per_sec"))

        def save(step: int, val_loss=None):
            nonlocal last_saved
            writer.sync()
            ckpt.save(step, state.params, state.opt_state, state.rng,
                      meta={"tokens_seen": step * tokens_per_step}, val_loss=val_loss)
            last_saved = step

        def run_eval(step: int):
            nonlocal last_eval, t_prev
            last_eval = {"step": step, **self.evaluator.evaluate(state.params, val_rows)}
            writer.write(last_eval)
            bar.write(f"step {step}: val_loss {last_eval['val_loss']:.4f}  perplexity {last_eval['perplexity']:.2f}")
            t_prev = None  # the next step's time would include the evaluation

        loader = TrainLoader(train_rows, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                             document_mask=cfg.data.document_mask, packing=cfg.data.packing,
                             sharding=self.builder.batch_sh, prefetch=cfg.data.prefetch)
        tracing = False
        try:
            with stop:
                for s, batch in loader.iterate(start, total_steps):
                    if profile and s == profile[0]:
                        flush()
                        # Traced into a local folder of its own, put in the run directory when the trace
                        # ends, and only once it is the run's: a first step that fails writes nothing there.
                        profile_dir = Path(tempfile.mkdtemp(prefix=f"{storage.TMP_PREFIX}profile-"))
                        jax.profiler.start_trace(str(profile_dir))
                        tracing = True
                    if s == start:  # the first call compiles the step: minutes for a large model
                        bar.write("compiling the train step; training starts when it is done")
                        t_compile = time.perf_counter()
                        state, metrics = wait_interruptibly(self.builder.step_fn, state, batch)
                        bar.write(f"compiled the train step in {time.perf_counter() - t_compile:.1f} s")
                    else:
                        state, metrics = self.builder.step_fn(state, batch)
                    flush()
                    pending = (s, metrics)
                    done = s + 1
                    if tracing and done == profile[1]:
                        flush()
                        jax.profiler.stop_trace()
                        tracing = False
                        publish_trace(profile_dir, self.run_dir)
                    do_eval = has_val and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                        and done < total_steps
                    do_ckpt = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < total_steps
                    preempted = stop.requested(done)
                    if do_eval or do_ckpt or preempted:
                        flush()  # never save or evaluate a step whose loss was not checked
                    if do_eval:
                        run_eval(done)
                    if do_ckpt or preempted:
                        save(done, last_eval["val_loss"] if do_eval else None)
                    if preempted:
                        ckpt.wait()
                        bar.write(f"preempted: checkpoint {done} written; run the same command to resume")
                        return {"step": done, "preempted": True}
                flush()
            done = int(jax.device_get(state.step))
            if final_eval and has_val and (last_eval is None or last_eval["step"] != done):
                run_eval(done)
            if last_saved != done:
                save(done, last_eval["val_loss"] if last_eval and last_eval["step"] == done else None)
            ckpt.wait()
        finally:
            if tracing:
                jax.profiler.stop_trace()
            if profile_dir is not None:
                publish_trace(profile_dir, self.run_dir, keep=committed)
            bar.close()
            writer.close()
            ckpt.close()
        timed = step_times[1:] or step_times
        summary = thr.summary(timed)
        if timed:
            summary["step_time_median_s"] = statistics.median(timed)
        return {"step": done, **(last_eval or {}), **{k: v for k, v in summary.items() if v is not None}}


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
