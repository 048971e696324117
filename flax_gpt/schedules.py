"""The learning-rate schedules after warmup, declared once: `SCHEDULES` maps each name to how its
decay is built and whether it needs the run's length. `optim.schedule` takes exactly its names
(config.py reads them from here), and train/optim.py builds the optimizer from it: a new schedule
is one entry here.

A schedule's `decay(cfg, total_steps, xp)` returns lr(s), the learning rate s steps after warmup
(s a float32 array, traced under jit). `xp` is the array namespace the caller computes with
(train/optim.py passes jax.numpy), so this module, like config.py, never imports jax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    # (cfg: OptimConfig, total_steps, xp) -> (steps since warmup -> learning rate)
    decay: Callable[[Any, int, Any], Callable]
    # Whether the schedule depends on the run's total steps (then changing them changes the result).
    needs_run_length: bool


def _exponential(cfg, total_steps: int, xp):
    """Keras' `ExponentialDecay(learning_rate, decay_steps, decay_rate, staircase)` after warmup:
    lr * decay_rate ** (s / decay_steps), with floor(s / decay_steps) when staircase. The decay clock
    s starts at the end of warmup (s = step - warmup_steps), so the peak lr is reached exactly once
    and `decay_steps` means the same thing with or without warmup; without warmup this is Keras'
    schedule unchanged. Needs no run length."""

    def decay(s):
        p = s / cfg.decay_steps
        if cfg.staircase:  # a Python bool from the config, so no traced branch
            p = xp.floor(p)
        return cfg.learning_rate * xp.power(xp.float32(cfg.decay_rate), p)

    return decay


def _decay_length(cfg, total_steps: int) -> float:
    return float(max(1, total_steps - cfg.warmup_steps))


def _cosine(cfg, total_steps: int, xp):
    """Half a cosine from the peak to peak * min_lr_ratio at the last step (transformers'
    `get_cosine_with_min_lr_schedule_with_warmup`; torch's CosineAnnealingLR with eta_min)."""
    n = _decay_length(cfg, total_steps)

    def decay(s):
        factor = 0.5 * (1.0 + xp.cos(xp.pi * xp.minimum(s / n, 1.0)))
        return cfg.learning_rate * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)

    return decay


def _linear(cfg, total_steps: int, xp):
    """A straight line from the peak to peak * min_lr_ratio at the last step
    (transformers' `get_linear_schedule_with_warmup` when min_lr_ratio is 0)."""
    n = _decay_length(cfg, total_steps)

    def decay(s):
        return cfg.learning_rate * (1.0 - (1.0 - cfg.min_lr_ratio) * xp.minimum(s / n, 1.0))

    return decay


def _constant(cfg, total_steps: int, xp):
    """The peak, after warmup (transformers' `get_constant_schedule_with_warmup`)."""
    return lambda s: xp.full_like(s, cfg.learning_rate)


def _wsd(cfg, total_steps: int, xp):
    """Warmup-stable-decay: the peak until the last `decay_fraction` of the run, then a straight
    line to peak * min_lr_ratio (transformers' `get_wsd_schedule`, decay_type="linear")."""
    n_decay = max(1, int(cfg.decay_fraction * total_steps))
    stable = max(0, total_steps - cfg.warmup_steps - n_decay)

    def decay(s):
        progress = xp.clip((s - stable) / n_decay, 0.0, 1.0)
        return cfg.learning_rate * (1.0 - (1.0 - cfg.min_lr_ratio) * progress)

    return decay


# The config's `optim.schedule` choices, in this order; "exponential" is its default.
SCHEDULES: dict[str, Schedule] = {
    "exponential": Schedule(_exponential, needs_run_length=False),
    "cosine": Schedule(_cosine, needs_run_length=True),
    "linear": Schedule(_linear, needs_run_length=True),
    "constant": Schedule(_constant, needs_run_length=False),
    "wsd": Schedule(_wsd, needs_run_length=True),
}
