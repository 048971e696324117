"""The optax chain: a learning-rate schedule from the registry in flax_gpt/schedules.py (exponential
as Keras' ExponentialDecay, the default; cosine, linear, constant, warmup-stable-decay; all with
linear warmup and built knowing the run's total steps), global-norm clipping, and AdamW with a
GPT-2-correct weight-decay mask.

Gradient accumulation is not here: the train step averages micro-batch gradients itself and calls
this optimizer once per optimizer step, so the schedule's count is the optimizer step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from flax_gpt.config import OptimConfig
from flax_gpt.schedules import SCHEDULES


def needs_run_length(cfg: OptimConfig) -> bool:
    """Whether the schedule depends on the run's total steps (then changing it changes the result)."""
    return SCHEDULES[cfg.schedule].needs_run_length


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (a Python int or a traced int array).

    Every schedule rises linearly from 0 at step 0 to `learning_rate` at step `warmup_steps`
    (step 0 of a warmup has lr 0: the first update only fills Adam's moments), then follows
    `optim.schedule` with its clock starting at the end of warmup. float32 like Keras (which casts
    the step to the lr's dtype): exact for steps below 2**24.
    """
    decay = SCHEDULES[cfg.schedule].decay(cfg, total_steps, jnp)
    lr, warmup = cfg.learning_rate, cfg.warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        decayed = decay(jnp.maximum(step - warmup, 0.0))
        if warmup <= 0:
            return decayed
        return jnp.where(step < warmup, lr * step / warmup, decayed)

    return schedule


def decay_mask(params, *, decay_embeddings: bool = True):
    """Pytree of bools, True where AdamW should apply weight decay.

    GPT-2 practice (and nanoGPT's `p.dim() >= 2` rule): decay the weight matrices only. Biases and
    LayerNorm scale/bias are never decayed: shrinking a LayerNorm scale toward 0 or a bias toward 0
    has no regularising meaning and only fights the model. Embedding tables are
    matrices too; whether to decay them is a recipe choice, so it is a setting.

    Decided by the leaf's own name (Flax: `kernel` for Dense/Conv1D, `embedding` for Embed), read
    from the path, so it works for any depth and for params nested under e.g. {'params': ...}.
    Non-dict path entries (e.g. the `.value` of a boxed, logically partitioned param) are skipped.
    """

    def leaf_name(path) -> str:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return str(keys[-1]) if keys else ""

    def decide(path, _):
        name = leaf_name(path)
        if name == "kernel":
            return True
        if name == "embedding":
            return decay_embeddings
        return False

    return jax.tree_util.tree_map_with_path(decide, params)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if cfg.clip_norm > 0) -> AdamW(schedule, masked weight decay).

    optax.adamw applies decoupled decay as update = -lr * (adam_step + wd * p), i.e.
    p <- p - lr*wd*p - lr*adam_step, the same as torch.optim.AdamW (tests check this). Clipping
    comes first so it sees the raw (accumulated) gradient, as torch's clip_grad_norm_ before
    optimizer.step(); the decay term is never clipped.
    """
    adamw = optax.adamw(
        learning_rate=make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        mu_dtype=jnp.bfloat16 if cfg.mu_dtype == "bfloat16" else None,  # None: the parameters' (float32)
        weight_decay=cfg.weight_decay,
        # A callable, so the mask is rebuilt from whatever tree the state is initialised with.
        mask=functools.partial(decay_mask, decay_embeddings=cfg.decay_embeddings),
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
