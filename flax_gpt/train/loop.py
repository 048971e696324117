"""What a training run holds between steps (`Loop`): the state, the checkpointer, the metrics
writer and progress bar, the last evaluation and the last saved step. `Trainer.fit` drives it;
the hooks (`train/hooks.py`) see the run through it."""

from __future__ import annotations

import statistics
import time

import jax

from flax_gpt.config import Config
from flax_gpt.errors import TrainError
from flax_gpt.model.family import flops_per_token
from flax_gpt.train.checkpoint import Checkpointer
from flax_gpt.train.metric_keys import GRAD_NORM, LOSS, LR, STEP, TOKENS_PER_SEC, TOKENS_SEEN, VAL_LOSS
from flax_gpt.train.metrics import ProgressBar, Throughput
from flax_gpt.train.run_dir import RunDir


class Loop:
    """What a training run holds between steps, and what hooks see: the run directory (`RunDir`),
    the state, the checkpointer, the metrics writer and progress bar, the last evaluation and the
    last saved step.

    A step's metrics are fetched one step late (`push`, then `flush`) so dispatch stays async;
    `flush` checks the loss is finite, writes the config at the first trained step (from then on
    the run directory is this run's), times the step and writes every `train.log_every`-th record.
    """

    def __init__(self, cfg: Config, ckpt: Checkpointer, state, start: int, total_steps: int, *, on_record=None):
        is_main = jax.process_index() == 0
        self.cfg, self.ckpt, self.state, self.total_steps = cfg, ckpt, state, total_steps
        self.run_dir = RunDir(cfg.train.run_dir)
        self.writer = self.run_dir.metrics_writer(enabled=is_main, purge_step=start or None, on_record=on_record,
                                                  config=cfg)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.thr = Throughput(tokens_per_step=self.tokens_per_step, n_devices=jax.device_count(),
                              flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
                              device_kind=jax.devices()[0].device_kind)
        self.bar = ProgressBar(total_steps, start, disable=not (is_main and cfg.train.progress))
        self.last_eval: dict | None = None
        self.last_saved = start if start in ckpt.steps() else None
        self.committed = False
        self._pending = None  # (step, device metrics)
        self._t_prev: float | None = None
        self._step_times: list[float] = []

    def push(self, step: int, metrics) -> None:
        """Step `step` (0-based) was dispatched: fetch the previous one's metrics, keep these."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Fetch and record the pending step's metrics, if any."""
        if self._pending is None:
            return
        s, m = self._pending
        self._pending = None
        m = jax.device_get(m)
        now = time.perf_counter()
        if not bool(m["finite"]):
            steps = self.ckpt.steps()
            raise TrainError(
                f"loss became non-finite at step {s + 1} (loss={float(m[LOSS])}, grad_norm="
                f"{float(m[GRAD_NORM])}); the update was skipped and nothing was saved; the latest "
                f"checkpoint is {steps[-1] if steps else 'none'}; lower optim.learning_rate")
        if not self.committed:  # the first trained step: from now on the run directory is this run's
            self.run_dir.commit_config(self.cfg)
            self.committed = True
        rec = {STEP: s + 1, LOSS: float(m[LOSS]), LR: float(m[LR]), GRAD_NORM: float(m[GRAD_NORM]),
               TOKENS_SEEN: (s + 1) * self.tokens_per_step}
        if self._t_prev is not None:  # the first fetched step includes compilation: not timed
            dt = now - self._t_prev
            self._step_times.append(dt)
            self.thr.update(dt)
            rec.update({k: v for k, v in self.thr.summary([dt]).items() if v is not None})
        self._t_prev = now
        if (s + 1) % self.cfg.train.log_every == 0 or s + 1 == self.total_steps:
            self.writer.write(rec)
        self.bar.update(s + 1, loss=rec[LOSS], tokens_per_sec=rec.get(TOKENS_PER_SEC))

    def untime(self) -> None:
        """Leave the next step untimed: something other than training ran since the last one."""
        self._t_prev = None

    def save(self, step: int) -> None:
        """Checkpoint the state as step `step`, with the val_loss when `step` was just evaluated."""
        val_loss = self.last_eval[VAL_LOSS] if self.last_eval and self.last_eval[STEP] == step else None
        self.writer.sync()
        self.ckpt.save(step, self.state.params, self.state.opt_state, self.state.rng, meta=self.meta(step),
                       val_loss=val_loss)
        self.last_saved = step

    def meta(self, step: int) -> dict:
        """What a checkpoint of step `step` records besides the state."""
        return {"tokens_seen": step * self.tokens_per_step}

    def summary(self) -> dict:
        """Throughput over the timed steps (the first timed one left out when there are more)."""
        timed = self._step_times[1:] or self._step_times
        summary = self.thr.summary(timed)
        if timed:
            summary["step_time_median_s"] = statistics.median(timed)
        return {k: v for k, v in summary.items() if v is not None}

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.ckpt.close()
