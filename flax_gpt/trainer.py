"""Orchestration: mesh, sharded state, the jitted step, the loop, evaluation, checkpoints, metrics.

No math lives here (see train_step.py); this file decides what runs when.
"""

from __future__ import annotations

import functools
import math
import signal
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt import flops
from flax_gpt.checkpoint import Checkpointer
from flax_gpt.config import Config, ConfigError
from flax_gpt.metrics import MetricsWriter, ProgressBar, Throughput
from flax_gpt.model import GPT2, abstract_params, init_params
from flax_gpt.optim import build_optimizer, make_schedule
from flax_gpt.sharding import (batch_sharding, check_divisible, make_mesh, param_shardings, replicated,
                               tree_shardings_like_params)
from flax_gpt.train_step import TrainState, eval_step, train_step


class TrainError(RuntimeError):
    """Training cannot go on (e.g. non-finite loss); the message names the step and what to do."""


def _place(tree, shardings):
    """Host numpy arrays (identical on every process) -> global jax.Arrays with these shardings."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), tree, shardings)


class Trainer:
    """Builds everything a run needs from a Config; `fit()` trains, `evaluate()` measures."""

    def __init__(self, cfg: Config, *, say=print):
        self.cfg, self.say = cfg, say
        self.run_dir = Path(cfg.train.run_dir)
        self.mesh = make_mesh(cfg.mesh)
        self.model = GPT2(cfg.model)
        self.schedule = make_schedule(cfg.optim)
        self.tx = build_optimizer(cfg.optim)

        boxed = abstract_params(cfg.model, boxed=True)
        self.abstract_params = nn.unbox(boxed)
        self.param_sh = param_shardings(self.mesh, boxed)
        check_divisible(self.abstract_params, self.param_sh)  # before anything is compiled
        rep = replicated(self.mesh)
        self.abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_sh = tree_shardings_like_params(self.abstract_opt, self.abstract_params, self.param_sh, self.mesh)
        self.state_sh = TrainState(step=rep, params=self.param_sh, opt_state=opt_sh, rng=rep)
        self.batch_sh = batch_sharding(self.mesh)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        micro = cfg.train.batch_size // cfg.train.grad_accum
        if micro % shards:
            raise ConfigError(f"micro-batch {micro} (train.batch_size / train.grad_accum) is not divisible by the "
                              f"{shards} batch shards (mesh.data x mesh.fsdp); change train.batch_size or the mesh")

        step = functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                                 grad_accum=cfg.train.grad_accum, document_mask=cfg.data.document_mask)
        self.step_fn = jax.jit(step, in_shardings=(self.state_sh, self.batch_sh),
                               out_shardings=(self.state_sh, rep), donate_argnames=("state",))
        ev = functools.partial(eval_step, model=self.model, document_mask=cfg.data.document_mask)
        self.eval_fn = jax.jit(ev, in_shardings=(self.param_sh, self.batch_sh), out_shardings=rep)

    # ---- state -------------------------------------------------------------------------------
    def _abstract(self, tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    def init_state(self, params=None, step: int = 0) -> TrainState:
        """A fresh state created by one jitted function with out_shardings: already sharded, never
        materialised whole on one device, and valid multi-host (no host-to-global device_put)."""
        cfg = self.cfg

        def build(p):
            init_key, state_key = jax.random.split(jax.random.key(cfg.train.seed))
            if p is None:
                p = nn.unbox(init_params(cfg.model, init_key))
            return TrainState(step=jnp.asarray(step, jnp.int32), params=p, opt_state=self.tx.init(p), rng=state_key)

        if params is None:
            return jax.jit(lambda: build(None), out_shardings=self.state_sh)()
        return jax.jit(build, in_shardings=(self.param_sh,), out_shardings=self.state_sh)(params)

    def load_or_init(self, ckpt: Checkpointer) -> TrainState:
        """Resume from the newest readable checkpoint, else start from model.init_from, else init."""
        cfg = self.cfg
        abs_params = self._abstract(self.abstract_params, self.param_sh)
        abs_opt = self._abstract(self.abstract_opt, self.state_sh.opt_state)
        abs_rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.state_sh.rng)
        restored = ckpt.restore_latest_good(abs_params, abs_opt, abs_rng, say=self.say) if ckpt.steps() else None
        if restored is not None:
            step = restored["meta"]["step"]
            if "opt_state" not in restored:  # an imported checkpoint: weights only
                self.say(f"starting from the weights of checkpoint {step} (no optimizer state in it)")
                return self.init_state(restored["params"], step=step)
            self.say(f"resuming from checkpoint {step}")
            step_arr = jax.jit(lambda: jnp.asarray(step, jnp.int32), out_shardings=self.state_sh.step)()
            return TrainState(step=step_arr, params=restored["params"], opt_state=restored["opt_state"],
                              rng=restored["rng"])
        if cfg.model.init_from:
            return self.init_state(self._params_from(cfg.model.init_from))
        return self.init_state()

    def _params_from(self, source: str):
        from flax_gpt.hf_io import load_hf
        from flax_gpt.run import CONFIG_FILE, check_same_architecture, load_params

        if (Path(source) / CONFIG_FILE).is_file():  # another run directory
            src_cfg, params, step, _ = load_params(source, mesh=self.mesh)
            check_same_architecture(self.cfg.model, src_cfg.model, source)
            self.say(f"initialised from {source} (step {step})")
            return params  # restored onto this mesh with the same rules: already placed
        hf_cfg, params = load_hf(source, lambda c: self.abstract_params,
                                 dtype=self.cfg.model.dtype, pad_vocab_to=self.cfg.model.pad_vocab_to)
        check_same_architecture(self.cfg.model, hf_cfg, source)
        self.say(f"initialised from Hugging Face weights: {source}")
        return _place(params, self.param_sh)

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, params, val_rows) -> dict:
        """Loss and perplexity over every validation token exactly once."""
        from flax_gpt.data import EvalLoader

        batch = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        loader = EvalLoader(val_rows, batch=batch, document_mask=self.cfg.data.document_mask,
                            packing=self.cfg.data.packing, sharding=self.batch_sh)
        loss_sum, tokens = 0.0, 0.0
        for b in loader:
            out = jax.device_get(self.eval_fn(params, b))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        val_loss = loss_sum / max(tokens, 1.0)
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700.0)), "tokens": int(tokens)}

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, train_rows, val_rows, total_steps: int, *, final_eval: bool = True) -> dict:
        cfg = self.cfg
        from flax_gpt.data import TrainLoader

        is_main = jax.process_index() == 0
        ckpt = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                            async_save=cfg.checkpoint.async_save)
        state = self.load_or_init(ckpt)
        start = int(jax.device_get(state.step))
        writer = MetricsWriter(self.run_dir, enabled=is_main, purge_step=start or None)
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        thr = Throughput(tokens_per_step=tokens_per_step, n_devices=jax.device_count(),
                         flops_per_token=flops.flops_per_token(cfg.model, cfg.data.seq_len),
                         device_kind=jax.devices()[0].device_kind)
        bar = ProgressBar(total_steps, start, disable=not (is_main and cfg.train.progress))
        stop = _PreemptionFlag()
        last_eval: dict | None = None
        last_saved = start if ckpt.steps() and start in ckpt.steps() else None
        pending = None  # (step, device metrics): fetched one step late so dispatch stays async
        t_prev = None
        step_times: list[float] = []

        def flush():
            nonlocal pending, t_prev
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
            ckpt.save(step, state.params, state.opt_state, state.rng,
                      meta={"tokens_seen": step * tokens_per_step}, val_loss=val_loss)
            last_saved = step

        def run_eval(step: int):
            nonlocal last_eval, t_prev
            last_eval = {"step": step, **self.evaluate(state.params, val_rows)}
            writer.write(last_eval)
            bar.write(f"step {step}: val_loss {last_eval['val_loss']:.4f}  perplexity {last_eval['perplexity']:.2f}")
            t_prev = None  # the next step's time would include the evaluation

        loader = TrainLoader(train_rows, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                             document_mask=cfg.data.document_mask, packing=cfg.data.packing,
                             sharding=self.batch_sh, prefetch=cfg.data.prefetch)
        try:
            with stop:
                for s, batch in loader.iterate(start, total_steps):
                    state, metrics = self.step_fn(state, batch)
                    flush()
                    pending = (s, metrics)
                    done = s + 1
                    do_eval = cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < total_steps
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
            if final_eval and (last_eval is None or last_eval["step"] != done):
                run_eval(done)
            if last_saved != done:
                save(done, last_eval["val_loss"] if last_eval and last_eval["step"] == done else None)
            ckpt.wait()
        finally:
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

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # noqa: BLE001 - the runtime was started without a preemption service
                return False
        return self._flag

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def total_steps(cfg: Config, train_rows: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    return max(1, int(np.ceil(cfg.train.epochs * train_rows / cfg.train.batch_size)))
