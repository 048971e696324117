"""GPT-2 in Flax linen, laid out exactly as Hugging Face's GPT2LMHeadModel.

Parameter names follow HF (`wte`, `wpe`, `h_{i}.ln_1`, `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`, `ln_2`, `ln_f`) and kernels are (in, out) like HF's `Conv1D`, so the weight map in
`hf.py` is a rename plus `h_{i}` <-> `h.{i}`. Every parameter carries logical axis names; the
one table in `sharding.py` maps them onto the mesh.

Dimension letters: B batch, T sequence (queries), S keys/cache length, D model width, H heads,
K head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt.config import ModelConfig
from flax_gpt.errors import ConfigError
from flax_gpt.model.attention import SPLASH_RESIDUALS, attend, causal_mask, kernel_for, splash_heads_major
from flax_gpt.sharding import constrain

Cache = tuple  # one {"k": (B,H,K,S), "v": (B,H,S,K)} dict per layer

# Logical axis names (mapped to mesh axes by sharding.RULES).
VOCAB, EMBED, POS, QKV, MLP, HEADS_OUT, NORM = "vocab", "embed", "pos", "qkv", "mlp", "heads", "norm"

# Large negative instead of -inf so masked softmax rows never produce NaN.
_NEG = -1e30


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _param(module: nn.Module, name: str, init, shape, axes) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel with the usual gradients, written out so the kernel's is one 2-D product.

    dkernel = x^T @ dy over all tokens at once. Left to autodiff, XLA's CPU backend asked for the
    residual stream's gradient in a transposed layout and fused the whole chain of earlier
    gradient terms into each transposing copy, recomputing it per layer: 11% of a distilgpt2
    step (seq 256, batch 4) went to those copies. Same values, same FLOPs, on every backend.
    """
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(res, dy):
    x, kernel = res
    dkernel = jnp.dot(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
    return jnp.dot(dy, kernel.T), dkernel.astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_rows(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """table[ids] in the compute dtype, as `nn.Embed(dtype=...)` computes it, without its cost.

    nn.Embed casts the whole float32 (V, D) table to the compute dtype and then gathers: at
    bfloat16 that reads and writes the table every step (0.23 GB for GPT-2's 50K x 768) for a
    few thousand rows. Here the rows are gathered first and cast after; the gradient is the one
    autodiff gives nn.Embed (the rows' cotangents added into a (V, D) table of the compute dtype,
    then cast to the table's), so training computes exactly what it did."""
    return jnp.take(table, ids, axis=0).astype(dtype)


def _embed_rows_fwd(table, ids, dtype):
    return embed_rows(table, ids, dtype), (table, ids)


def _embed_rows_bwd(dtype, res, g):
    table, ids = res
    dtable = jnp.zeros(table.shape, g.dtype).at[ids].add(g).astype(table.dtype)
    return dtable, np.zeros(ids.shape, jax.dtypes.float0)


embed_rows.defvjp(_embed_rows_fwd, _embed_rows_bwd)


class Conv1D(nn.Module):
    """HF's Conv1D: y = x @ kernel + bias with kernel stored (in, out).

    `transposed=True` reads the kernel stored (out, in) instead (see `GPT2.transposed_kernels`)."""

    features: int
    axes: tuple[str, str]
    dtype: Any
    std: float = 0.02
    transposed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(self.std)
        bias = _param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],))
        if self.transposed:
            kernel = _param(self, "kernel", init, (self.features, x.shape[-1]), self.axes[::-1])
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        else:
            kernel = _param(self, "kernel", init, (x.shape[-1], self.features), self.axes)
            y = _matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class HeadsConv1D(nn.Module):
    """HF's Conv1D, the same parameters, on head-major activations: (B,T,D) in and C projections
    of (B,H,T,K) out (c_attn: C=3, q, k, v), or (B,H,T,K) in and (B,T,features) out (c_proj). The
    heads are axes of the products themselves (the kernel viewed as (D,C,H,K) or (H,K,D)), so the
    compiler lays them out where the attention kernel wants them instead of copying activations
    between (B,T,H,K) and (B,H,T,K) around every call, forward and backward. Each of the C
    projections is its own product into its own buffer: one product into (C,B,H,T,K) made XLA
    copy the C slices out of it (a slice is never a view there) and concatenate their gradients
    back, 0.8 GB a step of distilgpt2 on v5e-8 (README)."""

    features: int
    axes: tuple[str, str]
    dtype: Any
    n_head: int
    std: float = 0.02
    first_scale: float = 1.0  # times the first projection (c_attn: q, by splash's 1/sqrt(K))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(self.std)
        bias = _param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],)).astype(self.dtype)
        H = self.n_head
        if x.ndim == 3:
            D = x.shape[-1]
            C, K = self.features // D, D // H
            kernel = _param(self, "kernel", init, (D, self.features), self.axes).astype(self.dtype)
            w, b = kernel.reshape(D, C, H, K), bias.reshape(C, H, 1, K)
            if self.first_scale != 1:  # folded into the weights, not a pass over the activations
                w, b = w.at[:, 0].multiply(self.first_scale), b.at[0].multiply(self.first_scale)
            x = x.astype(self.dtype)
            return tuple(jnp.einsum("btd,dhk->bhtk", x, w[:, c]) + b[c] for c in range(C))
        _, _, _, K = x.shape
        kernel = _param(self, "kernel", init, (H * K, self.features), self.axes).astype(self.dtype)
        return jnp.einsum("bhtk,hkf->btf", x.astype(self.dtype), kernel.reshape(H, K, self.features)) + bias


class LayerNorm(nn.Module):
    """LayerNorm with statistics in float32 whatever the compute dtype (bf16 variance is too coarse)."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (d,), (NORM,))
        bias = _param(self, "bias", nn.initializers.zeros, (d,), (NORM,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    transposed_kernels: bool = False

    def _splash(self, layer_cache, deterministic: bool, dtype, K: int, T: int) -> bool:
        """Training or evaluation on the splash kernel (not decoding, not attention dropout, not
        init, which runs the XLA path once for parameter shapes)."""
        if layer_cache is not None or self.is_initializing() or (self.cfg.attn_pdrop > 0 and not deterministic):
            return False
        return kernel_for(self.cfg.attention, dtype=dtype, K=K, T=T) == "splash"

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, layer_cache=None, cache_index=None, segment_ids=None):
        cfg, dtype, tk = self.cfg, _dtype(self.cfg.dtype), self.transposed_kernels
        B, T, D = x.shape
        H = cfg.n_head
        K = D // H
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        if self._splash(layer_cache, deterministic, dtype, K, T):
            # Splash reads and writes (B,H,T,K): project straight into and out of that layout.
            q, k, v = HeadsConv1D(3 * D, (EMBED, QKV), dtype, H, first_scale=1 / math.sqrt(K), name="c_attn")(x)
            out = splash_heads_major(q, k, v, segment_ids=segment_ids, q_scaled=True)
            out = HeadsConv1D(D, (HEADS_OUT, EMBED), dtype, H, std=proj_std, name="c_proj")(out)
            return nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), None
        qkv = Conv1D(3 * D, (EMBED, QKV), dtype, transposed=tk, name="c_attn")(x)  # (B,T,3D) as [q | k | v]
        q, k, v = (t.reshape(B, T, H, K) for t in jnp.split(qkv, 3, axis=-1))
        new_cache = None
        if layer_cache is not None:
            # Decode: attend over the cache as it was plus this call's own keys/values, then write
            # those at cache_index. Keys are kept (B,H,K,S) and values (B,H,S,K), the layouts the
            # attention dots read as plain matrix products (no per-step copy into another layout).
            # Reading the old cache rather than the updated one leaves the update a single
            # in-place write: attending over the updated cache made XLA copy every cache buffer
            # on every decode step.
            S = layer_cache["v"].shape[2]
            k_new = k.transpose(0, 2, 3, 1).astype(layer_cache["k"].dtype)  # (B,H,K,T)
            v_new = v.transpose(0, 2, 1, 3).astype(layer_cache["v"].dtype)  # (B,H,T,K)
            mask = jnp.concatenate([mask & (jnp.arange(S) < cache_index),  # filled slots of the old cache
                                    jax.lax.dynamic_slice_in_dim(mask, cache_index, T, axis=3)], axis=3)
            scores = jnp.concatenate(
                [jnp.einsum("bthk,bhks->bhts", q, kk.astype(dtype), preferred_element_type=jnp.float32)
                 for kk in (layer_cache["k"], k_new)], axis=3)
            probs = jax.nn.softmax(jnp.where(mask, scores / math.sqrt(K), _NEG), axis=-1).astype(dtype)
            out = (jnp.einsum("bhts,bhsk->bthk", probs[..., :S], layer_cache["v"].astype(dtype))
                   + jnp.einsum("bhts,bhsk->bthk", probs[..., S:], v_new.astype(dtype)))
            new_cache = {"k": jax.lax.dynamic_update_slice(layer_cache["k"], k_new, (0, 0, 0, cache_index)),
                         "v": jax.lax.dynamic_update_slice(layer_cache["v"], v_new, (0, 0, cache_index, 0))}
        elif cfg.attn_pdrop > 0 and not deterministic:
            # No attention kernel has dropout on the probabilities, so training with GPT-2's
            # attention dropout takes the explicit path (softmax in float32); `auto` comes here too.
            if cfg.attention in ("cudnn", "splash"):
                raise ConfigError(f"model.attention={cfg.attention} has no attention dropout; set "
                                  "model.attn_pdrop=0 (or model.attention=auto to train with it on the XLA path)")
            scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) / math.sqrt(K)
            scores = jnp.where(mask, scores, _NEG)
            probs = jax.nn.softmax(scores, axis=-1)
            probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=False).astype(dtype)
            out = jnp.einsum("bhts,bshk->bthk", probs, v.astype(dtype))
        else:  # training and evaluation: the kernel model.attention names (model/attention.py). Init
            # runs this once for parameter shapes only, at any length and device: the XLA path.
            kernel = "xla" if self.is_initializing() else cfg.attention
            out = attend(q, k.astype(dtype), v.astype(dtype), segment_ids=segment_ids, kernel=kernel)
        out = out.reshape(B, T, D)
        out = Conv1D(D, (HEADS_OUT, EMBED), dtype, std=proj_std, transposed=tk, name="c_proj")(out)
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return out, new_cache


class MLPBlock(nn.Module):
    cfg: ModelConfig
    transposed_kernels: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg, dtype, tk = self.cfg, _dtype(self.cfg.dtype), self.transposed_kernels
        h = Conv1D(cfg.d_ff, (EMBED, MLP), dtype, transposed=tk, name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" is the tanh approximation
        h = Conv1D(cfg.n_embd, (MLP, EMBED), dtype, std=0.02 / math.sqrt(2 * cfg.n_layer), transposed=tk,
                   name="c_proj")(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig
    transposed_kernels: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, layer_cache=None, cache_index=None, segment_ids=None):
        cfg, dtype, tk = self.cfg, _dtype(self.cfg.dtype), self.transposed_kernels
        a, new_cache = Attention(cfg, tk, name="attn")(
            LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_1")(x), mask, deterministic, layer_cache, cache_index,
            segment_ids,
        )
        x = x + a
        x = x + MLPBlock(cfg, tk, name="mlp")(LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_2")(x), deterministic)
        return x, new_cache


def attention_mask(
    T: int,
    segment_ids: jax.Array | None = None,
    kv_valid: jax.Array | None = None,
    cache_index: jax.Array | int | None = None,
    S: int | None = None,
) -> jax.Array:
    """Boolean mask (B|1, 1, T, S): causal, within one document, and over valid cache slots only.

    Training: query i sees key j <= i of the same segment (packed documents never attend to each
    other). Decoding: query i sits at cache slot cache_index + i and sees valid slots up to it.
    """
    if cache_index is None:
        return causal_mask(T, segment_ids)
    q_pos = cache_index + jnp.arange(T)[:, None]
    mask = (jnp.arange(S)[None, :] <= q_pos)[None, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :].astype(bool)
    return mask


# model.remat: what the backward pass keeps of each block (besides its input), the rest it
# recomputes. minimal (MaxText's name): the outputs of the weight matmuls (QKV, projections, MLP),
# so attention, LayerNorm and GELU are redone; save_attention: the attention kernel's output and
# softmax statistics (splash names them), so the recomputed block skips the kernel's forward pass;
# full: nothing, the whole block is redone. On a path whose attention names nothing (XLA, cuDNN),
# save_attention keeps what full keeps.
REMAT_POLICIES = {"minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "save_attention": jax.checkpoint_policies.save_only_these_names(SPLASH_RESIDUALS),
                  "full": None}


class GPT2(nn.Module):
    """GPT2LMHeadModel. Returns float logits over the (possibly padded) vocab; padded ids are masked.

    `transposed_kernels=True` takes every block kernel stored (out, in) (`transpose_kernels` makes
    such a tree): a matrix-vector product reads that layout faster on CPU, which is what decoding
    at small batch is bound by. Training and checkpoints always use the (in, out) layout.
    """

    cfg: ModelConfig
    transposed_kernels: bool = False

    def setup(self):
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        self.wte = nn.Embed(
            cfg.padded_vocab, cfg.n_embd, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
        )
        self.wpe = nn.Embed(
            cfg.n_positions, cfg.n_embd, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (POS, EMBED)),
        )
        block = Block if cfg.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                                                           static_argnums=(3,))
        self.h = [block(cfg, self.transposed_kernels, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, dtype)
        self.drop = nn.Dropout(cfg.embd_pdrop)

    def hidden(self, tokens, positions=None, segment_ids=None, *, deterministic=True,
               cache: Cache | None = None, cache_index=None, kv_valid=None):
        """Final hidden states (B,T,D) in the compute dtype, and the updated cache (or None)."""
        B, T = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(T)[None], (B, T))
        dtype = _dtype(self.cfg.dtype)
        x = embed_rows(self.wte.embedding, tokens, dtype) + embed_rows(self.wpe.embedding, positions, dtype)
        x = constrain(self.drop(x, deterministic=deterministic), "residual")
        S = None if cache is None else cache[0]["v"].shape[2]
        mask = attention_mask(T, segment_ids, kv_valid, cache_index, S)
        new_cache = []
        for i, block in enumerate(self.h):
            x, c = block(x, mask, deterministic, None if cache is None else cache[i], cache_index, segment_ids)
            x = constrain(x, "residual")
            new_cache.append(c)
        return self.ln_f(x), (tuple(new_cache) if cache is not None else None)

    def head(self) -> jax.Array:
        """The LM head (V_padded, D) float32, the matrix the chunked loss takes: the tied `wte`."""
        return self.wte.embedding

    def logits(self, h: jax.Array) -> jax.Array:
        """Tied LM head: (B,T,D) @ wte^T -> (B,T,V_padded) float32, padded ids at -1e30."""
        return mask_padded_vocab(constrain(self.wte.attend(h).astype(jnp.float32), "logits"), self.cfg)

    def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic=True,
                 cache: Cache | None = None, cache_index=None, kv_valid=None):
        h, new_cache = self.hidden(tokens, positions, segment_ids, deterministic=deterministic,
                                   cache=cache, cache_index=cache_index, kv_valid=kv_valid)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    """Zeroed KV cache for decoding, in the compute dtype."""
    K = cfg.n_embd // cfg.n_head
    dt = _dtype(cfg.dtype)
    keys, values = (batch, cfg.n_head, K, max_len), (batch, cfg.n_head, max_len, K)
    return tuple({"k": jnp.zeros(keys, dt), "v": jnp.zeros(values, dt)} for _ in range(cfg.n_layer))


def mask_padded_vocab(logits: jax.Array, cfg) -> jax.Array:
    """Logits (..., V_padded) with the padding ids (vocab_size and up) at -1e30: never sampled,
    nothing in a softmax."""
    if cfg.padded_vocab == cfg.vocab_size:
        return logits
    return jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, logits, _NEG)


def transpose_kernels(params):
    """The same parameters with every block kernel (in, out) -> (out, in), for a family's module
    built with `transposed_kernels=True`."""
    def flip(path, leaf):
        return leaf.T if path[-1].key == "kernel" else leaf

    return jax.tree_util.tree_map_with_path(flip, params)


def head_embedding(params, cfg: ModelConfig) -> jax.Array:
    """The LM head (V_padded, D) of a params tree: the tied `wte`."""
    return params["wte"]["embedding"]


def decoding_params(params, cfg: ModelConfig) -> dict:
    """The parameters laid out for decoding, which at small batch is bound by reading the weights.

    On CPU a matrix-vector product reads a weight stored (out, in) faster than (in, out): 1.3x for
    GPT-2's MLP projection (see `GPT2.transposed_kernels`). So every block kernel is transposed,
    and the tied head becomes a (D, V) matrix of the real vocab rows only, in the compute dtype
    (so sampling can never pick a padding id). Same values, another layout: logits are unchanged.
    """
    head = head_embedding(params, cfg)[: cfg.vocab_size].T.astype(jnp.dtype(cfg.dtype))
    return {**transpose_kernels(params), "head": head}


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Boxed (nn.Partitioned) parameters; call under jax.eval_shape for an abstract init."""
    model = GPT2(cfg)
    tokens = jnp.zeros((1, min(seq_len, cfg.n_positions)), jnp.int32)
    return model.init(rng, tokens)["params"]


def abstract_params(cfg: ModelConfig, *, boxed: bool = False):
    """Parameter shapes/dtypes (and logical axes when boxed) without allocating anything."""
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return tree if boxed else nn.unbox(tree)
