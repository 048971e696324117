"""TrainState, the loss, and the pure train/eval steps (functions of pytrees; no I/O, no logging)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from flax_gpt.model.loss import cross_entropy_sums
from flax_gpt.train.metric_keys import GRAD_NORM, LOSS, LR


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # typed PRNG key; dropout keys are fold_in(rng, step), so resume needs only the step


def document_positions(inputs: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """(positions, segment_ids) of packed rows (B,T), derived on the devices from the EOS ids: a
    segment id is 1 + the number of EOS strictly before (an EOS belongs to the document it ends),
    positions restart at 0 after each EOS. The host loader's `make_batch` computes the same values;
    deriving them here spares two (B,T) transfers a step. Scans are log-depth associative scans:
    XLA's CPU backend lowers cumsum/cummax to a quadratic reduce_window."""
    is_eos = (inputs == eos_id).astype(jnp.int32)
    idx = jnp.arange(inputs.shape[1], dtype=jnp.int32)[None, :]
    segment_ids = 1 + jax.lax.associative_scan(jnp.add, is_eos, axis=1) - is_eos
    last = jax.lax.associative_scan(jnp.maximum, jnp.where(is_eos > 0, idx, -1), axis=1)  # last EOS at/before i
    before = jnp.pad(last[:, :-1], ((0, 0), (1, 0)), constant_values=-1)  # ... strictly before i
    return idx - (before + 1), segment_ids


def _hidden_and_head(module: nn.Module, tokens, positions, segment_ids, deterministic: bool):
    """Final hidden states (B,T,D) in the compute dtype and the LM head (V_padded,D), float32."""
    h, _ = module.hidden(tokens, positions, segment_ids, deterministic=deterministic)
    return h, module.head()


def loss_sums(params, model: nn.Module, batch: dict, *, document_mask: bool, eos_id: int, dropout_rng=None,
              full_logits: bool = False):
    """(sum of next-token NLL over target positions, number of target positions), both float32.

    Sums rather than means so micro-batches and eval batches combine exactly by token count.
    The loss is taken chunk by chunk from the final hidden states (`flax_gpt.model.loss`): the float32
    (B,T,V) logits are never formed. `full_logits=True` is the plain reference, the model's logits
    and optax's cross-entropy, which the chunked loss is tested against.
    """
    deterministic = dropout_rng is None
    positions, segment_ids = document_positions(batch["inputs"], eos_id) if document_mask else (None, None)
    rngs = None if deterministic else {"dropout": dropout_rng}
    if full_logits:
        logits = model.apply({"params": params}, batch["inputs"], positions, segment_ids,
                             deterministic=deterministic, rngs=rngs)  # (B,T,V) float32
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(mask)
    h, head = model.apply({"params": params}, batch["inputs"], positions, segment_ids, deterministic,
                          rngs=rngs, method=_hidden_and_head)
    return cross_entropy_sums(h, head, batch["targets"], batch["loss_mask"], vocab_size=model.cfg.vocab_size)


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule, grad_accum: int, document_mask: bool, eos_id: int) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch split into `grad_accum` micro-batches.

    The gradient is of the mean NLL over all target tokens of the global batch, so 4 x B/4 equals
    one step of B. A non-finite loss or gradient leaves the state unchanged (the host then stops
    with an error naming the step), so nothing non-finite can ever be checkpointed.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    dropout = model.cfg.embd_pdrop > 0 or model.cfg.attn_pdrop > 0 or model.cfg.resid_pdrop > 0
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro(i, mb):
        key = jax.random.fold_in(rng, i) if dropout else None
        (loss_sum, count), grads = grad_fn(state.params, model, mb, document_mask=document_mask, eos_id=eos_id,
                                           dropout_rng=key)
        return loss_sum, count, grads

    if grad_accum == 1:
        loss_sum, count, grads = micro(0, batch)
    else:
        # (B, T) -> (A, B/A, T): micro-batch a takes rows a*B/A ... of the global batch.
        mbs = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, xs):
            i, mb = xs
            s, c, g = micro(i, mb)
            return (carry[0] + s, carry[1] + c, jax.tree.map(jnp.add, carry[2], g)), None

        (loss_sum, count, grads), _ = jax.lax.scan(
            body, (jnp.float32(0), jnp.float32(0), zeros), (jnp.arange(grad_accum), mbs))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + finite.astype(state.step.dtype),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
    )
    metrics = {LOSS: loss, GRAD_NORM: grad_norm, LR: schedule(state.step), "tokens": count, "finite": finite}
    return new_state, metrics


def eval_step(params, batch: dict, *, model: nn.Module, document_mask: bool, eos_id: int) -> dict:
    loss_sum, count = loss_sums(params, model, batch, document_mask=document_mask, eos_id=eos_id)
    return {"loss_sum": loss_sum, "tokens": count}
