"""Cross-entropy through the tied head as three Pallas TPU kernels: the logits live only in VMEM.

On a TPU the step is bound by HBM bandwidth, and the chunked loss of `loss.py` pays for it: every
chunk re-reads the head and updates a (V,D) float32 gradient accumulator in HBM (~0.46 GB per
chunk for GPT-2), and one big chunk writes and re-reads float32 (tokens x V) logits instead. Here
no logit ever reaches HBM. Tokens N (the batch rows flattened) and the vocabulary V are cut into
tiles; a tile's logits are a bf16 x bf16 matmul accumulated in float32 on the MXU, used at once
and dropped:

- `forward` (grid: token blocks x vocab blocks): the running max and sum of exp over the vocab
  blocks (flash attention's online softmax) give each token's logsumexp, and the target's logit
  is picked from the tile that holds it. HBM traffic: h once, the head once per token block.
- `grad_h` (same grid): dlogits = w * (softmax - onehot) per tile from the saved logsumexp,
  accumulated as dh += dlogits @ E in float32 VMEM, written once per token block.
- `grad_head` (grid: vocab blocks x token blocks): the same tile transposed, (vocab, tokens), so
  dE += dlogits^T @ h is a plain matmul accumulated in VMEM and written once per vocab block.

The two backward kernels each recompute their tiles' logits: 10 N V D FLOPs against autodiff's 6
(the head matmul of GPT-2 is ~15% of its step), for traffic of a few hundred MB instead of GBs;
on a bandwidth-bound step that trade wins. Each call carries a `pl.CostEstimate` (FLOPs, exp
count, bytes), so XLA's cost analysis and the compile estimate count the work.

V need not be a multiple of the vocab block: the grid's last block reaches past the head, and
what it reads there is undefined, so logits at or past `vocab_size` are masked (as the vocabulary
padding is) and `grad_h` zeroes those head rows; `grad_head`'s writes past V are dropped. Tiles keep
every kernel within the 16 MiB of VMEM a TPU v4 core has (see `SMALL_VMEM`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flax_gpt.model.attention import traced_device

LANES = 128
TOKEN_BLOCKS = (1024, 512, 256, 128)  # forward and grad_h: the head is re-read N / block times
HEAD_TOKEN_BLOCK = 512  # grad_head: its (vocab, tokens) float32 tile
# Vocab rows per tile. grad_head reads h once per vocab block, so its block is the largest; the
# others' only change the number of grid steps.
# grad_h holds a (tokens, D) float32 accumulator, its double-buffered h and dh windows and the
# compiler's spill slots: 18.2 MiB at 1024 tokens, over the 16 MiB of VMEM a TPU v4 core has, so
# there it takes 512-token tiles (reading the head twice as often); newer generations have more,
# but XLA gives a kernel 16 MiB of it unless the kernel asks for more, and at 64K tokens per
# device (distilgpt2, global batch 512 on v5e-8) XLA:TPU's allocation came to 18.0 MiB: so it asks.
SMALL_VMEM = ("TPU v4",)
GRAD_H_VMEM_BYTES = 32 * 2**20
FORWARD_VOCAB_BLOCK, GRAD_H_VOCAB_BLOCK, HEAD_VOCAB_BLOCK = 512, 512, 1024
_NEG = -1e30  # as loss.py: a masked logit whose exp() is exactly 0


def head_vocab_block(d: int) -> int:
    """grad_head's vocab rows per tile for width d. Its float32 (vocab, d) output window is
    double-buffered: 6 MiB at GPT-2's 1024 x 768, and 8 MiB at gpt2-medium's d=1024 took the
    kernel to 18.3 MiB of VMEM, over the 16 MiB XLA gives it (v4-8 and v5p-8 did not compile).
    So the tile holds at most 1024 x 768 elements, halving the rows (never below 128) for wider models."""
    vb = HEAD_VOCAB_BLOCK
    while vb > LANES and vb * d > HEAD_VOCAB_BLOCK * 768:
        vb //= 2
    return vb


def token_block(n: int) -> int | None:
    """The token tile for n tokens (a multiple of the 128 lanes that divides n), or None."""
    return next((b for b in TOKEN_BLOCKS if n % b == 0), None)


def _params(*semantics: str, vmem_limit_bytes: int | None = None):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def _tile_logits(x, e, v0, vocab_size: int, *, transposed: bool):
    """(tokens, vocab) float32 logits of a tile, or (vocab, tokens) when transposed; columns at or
    past vocab_size masked."""
    dims = (((1,), (1,)), ((), ()))
    logits = jax.lax.dot_general(e, x, dims, preferred_element_type=jnp.float32) if transposed else \
        jax.lax.dot_general(x, e, dims, preferred_element_type=jnp.float32)
    axis = 0 if transposed else 1
    ids = v0 + jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    return jnp.where(ids < vocab_size, logits, _NEG), ids


def _forward_kernel(x_ref, e_ref, t_ref, lse_ref, tgt_ref, m_sc, l_sc, t_sc, *, vocab_size: int):
    j = pl.program_id(1)
    vb = e_ref.shape[0]

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        t_sc[...] = jnp.zeros(t_sc.shape, jnp.float32)

    logits, ids = _tile_logits(x_ref[...], e_ref[...], j * vb, vocab_size, transposed=False)
    t_sc[...] += jnp.sum(jnp.where(ids == t_ref[...], logits, 0.0), axis=1, keepdims=True)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_next) + jnp.sum(jnp.exp(logits - m_next), axis=1, keepdims=True)
    m_sc[...] = m_next

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])
        tgt_ref[...] = t_sc[...]


def _grad_h_kernel(x_ref, e_ref, t_ref, lse_ref, w_ref, dh_ref, acc, *, vocab_size: int):
    j = pl.program_id(1)
    vb = e_ref.shape[0]

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    # The last vocab block may reach past the head's rows: what is read there is undefined, so
    # those rows are zeroed before they meet dlogits (whose columns there are 0 already).
    rows = j * vb + jax.lax.broadcasted_iota(jnp.int32, (vb, 1), 0)
    e = jnp.where(rows < vocab_size, e_ref[...], 0)
    logits, ids = _tile_logits(x_ref[...], e, j * vb, vocab_size, transposed=False)
    probs = jnp.exp(logits - lse_ref[...])
    dl = ((probs - (ids == t_ref[...]).astype(jnp.float32)) * w_ref[...]).astype(e.dtype)
    acc[...] += jnp.dot(dl, e, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _grad_head_kernel(x_ref, e_ref, t_ref, lse_ref, w_ref, de_ref, *, vocab_size: int):
    j, i = pl.program_id(0), pl.program_id(1)
    vb = e_ref.shape[0]

    @pl.when(i == 0)
    def _():
        de_ref[...] = jnp.zeros(de_ref.shape, jnp.float32)

    # The float32 output block stays in VMEM over the token blocks: it is the accumulator.
    x = x_ref[...]
    logits, ids = _tile_logits(x, e_ref[...], j * vb, vocab_size, transposed=True)  # (vocab, tokens)
    probs = jnp.exp(logits - lse_ref[...])
    dl = ((probs - (ids == t_ref[...]).astype(jnp.float32)) * w_ref[...]).astype(x.dtype)
    de_ref[...] += jnp.dot(dl, x, preferred_element_type=jnp.float32)




def _cost(flops: float, exps: float, nbytes: float) -> pl.CostEstimate:
    return pl.CostEstimate(flops=int(flops), transcendentals=int(exps), bytes_accessed=int(nbytes))


def forward(x: jax.Array, e: jax.Array, targets: jax.Array, *, vocab_size: int,
            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x (N,D) and e (V,D) in the compute dtype, targets (N,) int -> (logsumexp (N,), target logit
    (N,)) float32 over the first vocab_size rows of e."""
    (N, D), tb = x.shape, token_block(x.shape[0])
    vb = FORWARD_VOCAB_BLOCK
    V, nb, nv = e.shape[0], N // tb, pl.cdiv(e.shape[0], vb)
    col = pl.BlockSpec((tb, 1), lambda i, j: (i, 0))
    lse, tgt = pl.pallas_call(
        functools.partial(_forward_kernel, vocab_size=vocab_size),
        grid=(nb, nv),
        in_specs=[pl.BlockSpec((tb, D), lambda i, j: (i, 0)), pl.BlockSpec((vb, D), lambda i, j: (j, 0)), col],
        out_specs=[col, col],
        out_shape=[jax.ShapeDtypeStruct((N, 1), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((tb, 1), jnp.float32)] * 3,
        compiler_params=_params("parallel", "arbitrary"),
        cost_estimate=_cost(2 * N * V * D, N * V, x.nbytes + nb * e.nbytes + 12 * N),
        interpret=interpret,
    )(x, e, targets.reshape(N, 1).astype(jnp.int32))
    return lse[:, 0], tgt[:, 0]


def grad_h(x, e, targets, lse, w, *, vocab_size: int, interpret: bool = False) -> jax.Array:
    """dh (N,D) in x's dtype: sum over the vocabulary of w * (softmax - onehot) times the head."""
    (N, D), tb = x.shape, token_block(x.shape[0])
    vmem = GRAD_H_VMEM_BYTES
    if traced_device()[1].startswith(SMALL_VMEM):
        tb, vmem = min(tb, 512), None
    vb = GRAD_H_VOCAB_BLOCK
    V, nb, nv = e.shape[0], N // tb, pl.cdiv(e.shape[0], vb)
    col = pl.BlockSpec((tb, 1), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_grad_h_kernel, vocab_size=vocab_size),
        grid=(nb, nv),
        in_specs=[pl.BlockSpec((tb, D), lambda i, j: (i, 0)), pl.BlockSpec((vb, D), lambda i, j: (j, 0)),
                  col, col, col],
        out_specs=pl.BlockSpec((tb, D), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((N, D), x.dtype),
        scratch_shapes=[pltpu.VMEM((tb, D), jnp.float32)],
        compiler_params=_params("parallel", "arbitrary", vmem_limit_bytes=vmem),
        cost_estimate=_cost(4 * N * V * D, N * V, 2 * x.nbytes + nb * e.nbytes + 12 * N),
        interpret=interpret,
    )(x, e, targets.reshape(N, 1).astype(jnp.int32), lse.reshape(N, 1), w.reshape(N, 1).astype(jnp.float32))


def grad_head(x, e, targets, lse, w, *, vocab_size: int, interpret: bool = False) -> jax.Array:
    """dE (V,D) float32 for e's rows: the sum over tokens of w * (softmax - onehot) times h."""
    N, D = x.shape
    tb = math.gcd(N, HEAD_TOKEN_BLOCK) if N % LANES == 0 else N
    vb = head_vocab_block(D)
    V, nb, nv = e.shape[0], N // tb, pl.cdiv(e.shape[0], vb)
    row = pl.BlockSpec((1, tb), lambda j, i: (0, i))
    return pl.pallas_call(
        functools.partial(_grad_head_kernel, vocab_size=vocab_size),
        grid=(nv, nb),
        in_specs=[pl.BlockSpec((tb, D), lambda j, i: (i, 0)), pl.BlockSpec((vb, D), lambda j, i: (j, 0)),
                  row, row, row],
        out_specs=pl.BlockSpec((vb, D), lambda j, i: (j, 0)),
        out_shape=jax.ShapeDtypeStruct((V, D), jnp.float32),
        compiler_params=_params("parallel", "arbitrary"),
        cost_estimate=_cost(4 * N * V * D, N * V, nv * x.nbytes + e.nbytes + V * D * 4 + 12 * N * nv),
        interpret=interpret,
    )(x, e, targets.reshape(1, N).astype(jnp.int32), lse.reshape(1, N), w.reshape(1, N).astype(jnp.float32))
