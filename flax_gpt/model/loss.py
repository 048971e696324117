"""Next-token cross-entropy through a tied vocabulary head, without float32 (tokens x V) logits.

Written out in full, the loss of a GPT-2 step is its biggest buffer: float32 logits (B,T,V) plus
their softmax and gradient, each B*T*V*4 bytes (196 MiB at B=4, T=256, V=50257; 6 GiB at B=32,
T=1024), written and read several times for what is in the end one number per token. Here the
positions of T are taken a chunk at a time (`jax.lax.fori_loop`): a chunk's logits (B,c,V) are a
matmul in the compute dtype accumulated in float32 (`preferred_element_type`), reduced at once
to logsumexp and target logit, and dropped. Only chunk-sized logits ever exist (at most
`LOGITS_CHUNK_BYTES` per device).

The gradient is formed in the same pass (a `jax.custom_vjp` whose forward also returns it): the
loss is a weighted sum, so its cotangent is one scalar g, and d(sum)/d(logits) = w * (softmax -
onehot) is known once the chunk's logsumexp is. Each chunk adds dh = dlogits @ E and dE +=
dlogits^T @ h, and the backward pass only scales them by g. Same FLOPs as autodiff of the full
logits (forward 2BTVD, gradients 4BTVD), no recompute. Evaluation (no gradient) runs the primal,
which computes the loss alone.

Padded vocabulary rows (`model.pad_vocab_to`) get a logit of -1e30: exp() of it is exactly 0, so
they carry no probability and no gradient, as in `GPT2.logits`.

On a TPU `cross_entropy_sums` runs the fused Pallas kernels of `loss_kernel.py` instead (same
numbers: float32-accumulated tile products, dlogits rounded to the compute dtype), which keep the
logits in VMEM: the loop's per-chunk head reads and (V,D) accumulator updates cost a bandwidth-bound
TPU step GBs of HBM traffic. Elsewhere (CPU, GPU) this loop runs.

On a mesh the chunk keeps the sharding the full logits have (`sharding.ACTIVATIONS["logits"]`:
batch over the batch axes, V over the tensor axis). dE is a sum over tokens, which are split over
the batch axes: accumulated into one (V,D) it would be reduced across devices once per chunk, so
each batch shard accumulates its own partial sum on an explicit leading axis (S,V,D) and the
shards are reduced once, after the loop, as autodiff of the full logits does.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flax_gpt.model import loss_kernel
from flax_gpt.model.attention import traced_device
from flax_gpt.sharding import ACTIVATIONS, per_device

# Float32 logits of one chunk, per device: the largest chunk-sized buffer, of which three or four
# are live at once (logits, their exp, dlogits and, on CPU, a transposed copy for the dE matmul).
# The size trades memory for traffic: each chunk also reads the head (V,D) twice (the logits and
# dh matmuls) and updates the (V,D) float32 dE accumulator, 12-16 bytes per head element (0.5-0.6
# GB for GPT-2), while its own logits cost ~20 bytes each (~0.35 GB at this size: ~330 tokens at
# V=50257). Cheap where matmuls bound the step (a CPU); a bandwidth-bound accelerator wants
# fewer, larger chunks where its memory allows.
LOGITS_CHUNK_BYTES = 64 * 2**20

# As in GPT2.logits: large and finite, so a masked row never turns into NaN.
_NEG = -1e30


class Plan(NamedTuple):
    """Static shape of the loop: `chunk` positions of T per step, `n_chunks` steps. When chunk does
    not divide T the last chunk starts at T - chunk and overlaps the one before it; the positions
    seen twice are counted once (see `_chunk_step`)."""

    vocab_size: int
    chunk: int
    n_chunks: int


def _axes_size(mesh, axes) -> int:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)


def _layout():
    """(batch shards S, vocab shards, batch axes, vocab axes) of the logits on the context mesh.

    Derived from the logits' activation sharding, so this module names no mesh axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1, 1, None, None
    spec = ACTIVATIONS["logits"]  # (B, T, V)
    return _axes_size(mesh, spec[0]), _axes_size(mesh, spec[2]), spec[0], spec[2]


def _pin(x: jax.Array, spec: P) -> jax.Array:
    return x if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(x, spec)


def plan_chunks(B: int, T: int, V: int, vocab_size: int, *, chunk: int | None = None,
                batch_shards: int = 1, vocab_shards: int = 1, budget: int | None = None) -> Plan:
    """The chunk along T whose float32 logits per device fit `budget` bytes (or `chunk` as given).

    A divisor of T is preferred (no overlap) when it is at least half the largest chunk that fits;
    otherwise the fewest chunks that fit, evened out so the last one overlaps as little as it can."""
    if chunk is None:
        budget = LOGITS_CHUNK_BYTES if budget is None else budget
        per_position = -(-B // batch_shards) * -(-V // vocab_shards) * 4  # bytes of one position's logits
        cap = max(1, min(T, budget // per_position))
        divisor = max(d for d in range(1, cap + 1) if T % d == 0)
        chunk = divisor if 2 * divisor >= cap else -(-T // -(-T // cap))
    chunk = max(1, min(int(chunk), T))
    return Plan(vocab_size, chunk, -(-T // chunk))


def _chunk_logits(hc, e, vocab_size, spec):
    """(B,c,D) x (V,D) -> (B,c,V) float32, accumulated in float32 whatever the compute dtype."""
    logits = _pin(jnp.einsum("btd,vd->btv", hc, e, preferred_element_type=jnp.float32), spec)
    if e.shape[0] != vocab_size:
        logits = jnp.where(jnp.arange(e.shape[0]) < vocab_size, logits, _NEG)
    return logits


def _chunk_step(i, h, e, targets, weights, plan: Plan, layout, with_grads: bool):
    """Chunk i: its start along T, its per-token NLL (B,c), its weights (B,c), which of its
    positions no earlier chunk has counted (c,), and (with_grads) dlogits = w * (softmax - onehot)
    in the compute dtype, (B,c,V)."""
    T = h.shape[1]
    c = plan.chunk
    start = jnp.minimum(i * c, T - c)  # the last chunk may overlap the one before it
    hc = jax.lax.dynamic_slice_in_dim(h, start, c, axis=1)
    tc = jax.lax.dynamic_slice_in_dim(targets, start, c, axis=1)
    wc = jax.lax.dynamic_slice_in_dim(weights, start, c, axis=1)
    fresh = (start + jnp.arange(c)) >= i * c  # (c,): positions an earlier chunk has not counted
    logits = _chunk_logits(hc, e, plan.vocab_size, P(layout[2], None, layout[3]))
    m = jnp.max(logits, axis=-1, keepdims=True)
    lse = m[..., 0] + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1))  # (B,c)
    onehot = jnp.arange(logits.shape[-1]) == tc[..., None]  # compared in place: no gather on a split V
    nll = lse - jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    dlogits = None
    if with_grads:
        probs = jnp.exp(logits - lse[..., None])  # padded rows: exp(-1e30 - lse) == 0 exactly
        dlogits = ((probs - onehot) * wc[..., None]).astype(h.dtype)
    return start, nll, wc, fresh, dlogits


def _loss_only(h, e, targets, weights, plan: Plan):
    """The loss sum alone: one matmul per chunk, nothing kept for a backward pass."""
    layout = _layout()

    def body(i, total):
        _, nll, wc, fresh, _ = _chunk_step(i, h, e, targets, weights, plan, layout, with_grads=False)
        return total + jnp.sum(nll * wc * fresh)

    return jax.lax.fori_loop(0, plan.n_chunks, body, jnp.float32(0))


def _loss_and_grads(h, e, targets, weights, plan: Plan):
    """The loss sum, per-token NLL (B,T), dh (B,T,D) in h's dtype, dE (V,D) float32."""
    layout = _layout()
    S, _, batch_axes, vocab_axes = layout
    B, T, D = h.shape
    V = e.shape[0]
    S = S if B % S == 0 else 1
    # One partial dE per batch shard (S,V,D), V split as in the logits, summed once after the loop.
    # A single (V,D) accumulator, left to XLA's propagation, took the parameter's layout and was
    # all-reduced inside the loop, every chunk (seen on a data x fsdp x tensor CPU mesh).
    acc_spec = P(batch_axes, vocab_axes, None)

    def body(i, carry):
        total, nll_all, dh, de = carry
        start, nll, wc, fresh, dl = _chunk_step(i, h, e, targets, weights, plan, layout, with_grads=True)
        hc = jax.lax.dynamic_slice_in_dim(h, start, plan.chunk, axis=1)
        # dh of every position in the chunk (a position seen twice gets the same value again);
        # dE and the loss only from the fresh ones.
        dhc = jnp.einsum("btv,vd->btd", dl, e, preferred_element_type=jnp.float32).astype(h.dtype)
        dl_fresh = jnp.where(fresh[:, None], dl, 0) if plan.n_chunks * plan.chunk != T else dl
        part = jnp.einsum("sbtv,sbtd->svd", dl_fresh.reshape(S, B // S, plan.chunk, V),
                          hc.reshape(S, B // S, plan.chunk, D), preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * wc * fresh),
                jax.lax.dynamic_update_slice_in_dim(nll_all, nll, start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(dh, dhc, start, axis=1),
                _pin(de + part, acc_spec))

    init = (jnp.float32(0), jnp.zeros(targets.shape, jnp.float32), jnp.zeros_like(h),
            _pin(jnp.zeros((S, V, D), jnp.float32), acc_spec))
    total, nll_all, dh, de = jax.lax.fori_loop(0, plan.n_chunks, body, init)
    return total, nll_all, dh, jnp.sum(de, axis=0)


def _compute_embedding(embedding, dtype):
    """The head in the compute dtype, laid out as the logits' V (its width gathered once, outside
    the loop, rather than per chunk when the parameters are split by width)."""
    _, _, _, vocab_axes = _layout()
    return _pin(embedding.astype(dtype), P(vocab_axes, None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(h, embedding, targets, weights, plan: Plan):
    """sum(weights * NLL), weights (B,T) float32."""
    return _loss_only(h, _compute_embedding(embedding, h.dtype), targets, weights, plan)


def _weighted_nll_sum_fwd(h, embedding, targets, weights, plan):
    total, nll, dh, de = _loss_and_grads(h, _compute_embedding(embedding, h.dtype), targets, weights, plan)
    return total, (dh, de.astype(embedding.dtype), nll)


def _weighted_nll_sum_bwd(plan, res, g):
    dh, de, nll = res
    return (g * dh.astype(jnp.float32)).astype(dh.dtype), g * de, None, g * nll


_weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)


def _batch_axis_names(batch_axes) -> tuple:
    return tuple(a for a in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)) if a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_nll_sum(h, embedding, targets, weights, vocab_size: int, interpret: bool):
    """sum(weights * NLL) by the Pallas kernels of `loss_kernel` (forward only: evaluation)."""
    return _fused_fwd(h, embedding, targets, weights, vocab_size, interpret)[0]


def _fused_fwd(h, embedding, targets, weights, vocab_size, interpret):
    D = h.shape[-1]
    e = _compute_embedding(embedding, h.dtype)
    batch = _layout()[2]

    def local(h, e, t):
        lse, tgt = loss_kernel.forward(h.reshape(-1, D), e, t.reshape(-1), vocab_size=vocab_size, interpret=interpret)
        return lse.reshape(t.shape), tgt.reshape(t.shape)

    lse, tgt = per_device(local, (h, e, targets), (P(batch, None, None), P(None, None), P(batch, None)),
                           (P(batch, None),) * 2)
    nll = lse - tgt
    return jnp.sum(nll * weights), (h, e, targets, weights, lse, nll)


def _fused_bwd(vocab_size, interpret, res, g):
    h, e, targets, weights, lse, nll = res
    D = h.shape[-1]
    batch = _layout()[2]
    names = _batch_axis_names(batch)

    def local(h, e, t, lse, w):
        x, t, lse, w = h.reshape(-1, D), t.reshape(-1), lse.reshape(-1), w.reshape(-1)
        dh = loss_kernel.grad_h(x, e, t, lse, w, vocab_size=vocab_size, interpret=interpret).reshape(h.shape)
        de = loss_kernel.grad_head(x, e, t, lse, w, vocab_size=vocab_size, interpret=interpret)
        return dh, de[None]  # each device's dE, over its own tokens

    row = P(batch, None)
    dh, de = per_device(local, (h, e, targets, lse, weights * g), (P(batch, None, None), P(None, None), row, row, row),
                         (P(batch, None, None), P(names or None, None, None)))
    # Summed across the batch shards outside the kernels' shard_map, where XLA sees a gradient of
    # partial sums like the embedding lookup's and reduces them together.
    return dh, jnp.sum(de, axis=0), None, g * nll


_fused_nll_sum.defvjp(_fused_fwd, _fused_bwd)


def choose_kernel(kernel: str, *, platform: str, B: int, T: int, batch_shards: int, vocab_shards: int,
                  interpret: bool = False) -> str:
    """`pallas` (the fused kernels of `loss_kernel`) or `chunked` (this module's loop) for `kernel`
    = auto | pallas | chunked. auto: pallas on a TPU when each device holds whole rows, the
    vocabulary is not split over devices and its tokens tile into the kernel's blocks, else chunked."""
    fits = vocab_shards == 1 and B % batch_shards == 0 and loss_kernel.token_block(B // batch_shards * T) is not None
    if kernel == "chunked" or (kernel == "auto" and not (platform == "tpu" and fits)):
        return "chunked"
    if not fits:
        raise ValueError(f"the fused loss kernel needs whole rows per device, an unsplit vocabulary and a multiple "
                         f"of {loss_kernel.LANES} tokens per device (got B={B}, T={T}, {batch_shards} batch shards, "
                         f"{vocab_shards} vocab shards)")
    if platform != "tpu" and not interpret:
        raise ValueError("the fused loss kernel needs a TPU (or interpret=True)")
    return "pallas"


def cross_entropy_sums(h: jax.Array, embedding: jax.Array, targets: jax.Array, mask: jax.Array, *,
                       vocab_size: int, chunk: int | None = None, kernel: str = "auto",
                       interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum over tokens of mask * NLL(target | h), sum of mask), both float32.

    h (B,T,D) final hidden states in the compute dtype; embedding (V_padded,D) the tied head's
    float32 parameters (cast to h's dtype for the matmuls); targets (B,T) int; mask (B,T). Only
    the first `vocab_size` rows of the head are candidates. `kernel` (`choose_kernel`): on a TPU
    the fused Pallas kernels, elsewhere the chunked loop, whose `chunk` (positions of T per loop
    step) defaults to what `LOGITS_CHUNK_BYTES` allows; `interpret` runs the kernels in Pallas'
    interpreter (tests on CPU). Differentiable in h, embedding and mask.
    """
    B, T, _ = h.shape
    S, tp, _, _ = _layout()
    mask = mask.astype(jnp.float32)
    chosen = choose_kernel(kernel, platform=traced_device()[0], B=B, T=T, batch_shards=S, vocab_shards=tp,
                           interpret=interpret)
    if chosen == "pallas":
        return _fused_nll_sum(h, embedding, targets, mask, vocab_size, interpret), jnp.sum(mask)
    plan = plan_chunks(B, T, embedding.shape[0], vocab_size, chunk=chunk, batch_shards=S, vocab_shards=tp)
    return _weighted_nll_sum(h, embedding, targets, mask, plan), jnp.sum(mask)
