"""GPT-2 in Flax linen, laid out exactly as Hugging Face's GPT2LMHeadModel.

Parameter names follow HF (`wte`, `wpe`, `h_{i}.ln_1`, `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`, `ln_2`, `ln_f`) and kernels are (in, out) like HF's `Conv1D`, so the weight map in
`hf_io.py` is a rename plus `h_{i}` <-> `h.{i}`. Every parameter carries logical axis names; the
one table in `sharding.py` maps them onto the mesh.

Dimension letters: B batch, T sequence (queries), S keys/cache length, D model width, H heads,
K head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt.config import ModelConfig

Cache = tuple  # one {"k": (B,S,H,K), "v": (B,S,H,K)} dict per layer

# Logical axis names (mapped to mesh axes by sharding.RULES).
VOCAB, EMBED, POS, QKV, MLP, HEADS_OUT, NORM = "vocab", "embed", "pos", "qkv", "mlp", "heads", "norm"

# Large negative instead of -inf so masked softmax rows never produce NaN.
_NEG = -1e30


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _param(module: nn.Module, name: str, init, shape, axes) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Conv1D(nn.Module):
    """HF's Conv1D: y = x @ kernel + bias with kernel stored (in, out)."""

    features: int
    axes: tuple[str, str]
    dtype: Any
    std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features), self.axes)
        bias = _param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],))
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


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

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, layer_cache=None, cache_index=None):
        cfg, dtype = self.cfg, _dtype(self.cfg.dtype)
        B, T, D = x.shape
        H = cfg.n_head
        K = D // H
        qkv = Conv1D(3 * D, (EMBED, QKV), dtype, name="c_attn")(x)  # (B,T,3D) as [q | k | v]
        q, k, v = (t.reshape(B, T, H, K) for t in jnp.split(qkv, 3, axis=-1))
        new_cache = None
        if layer_cache is not None:
            # Decode: write this step's keys/values at cache_index, attend over the whole cache.
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": k, "v": v}
        if cfg.attn_pdrop > 0 and not deterministic:
            # jax.nn.dot_product_attention has no dropout on the probabilities, so training with
            # GPT-2's attention dropout takes the explicit path (softmax in float32).
            scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) / math.sqrt(K)
            scores = jnp.where(mask, scores, _NEG)
            probs = jax.nn.softmax(scores, axis=-1)
            probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=False).astype(dtype)
            out = jnp.einsum("bhts,bshk->bthk", probs, v.astype(dtype))
        else:
            impl = "cudnn" if cfg.attention == "cudnn" else "xla"
            out = jax.nn.dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask=mask, implementation=impl)
        out = out.reshape(B, T, D)
        out = Conv1D(D, (HEADS_OUT, EMBED), dtype, std=0.02 / math.sqrt(2 * cfg.n_layer), name="c_proj")(out)
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return out, new_cache


class MLPBlock(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg, dtype = self.cfg, _dtype(self.cfg.dtype)
        h = Conv1D(cfg.d_ff, (EMBED, MLP), dtype, name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's "gelu_new" is the tanh approximation
        h = Conv1D(cfg.n_embd, (MLP, EMBED), dtype, std=0.02 / math.sqrt(2 * cfg.n_layer), name="c_proj")(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, layer_cache=None, cache_index=None):
        cfg, dtype = self.cfg, _dtype(self.cfg.dtype)
        a, new_cache = Attention(cfg, name="attn")(
            LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_1")(x), mask, deterministic, layer_cache, cache_index
        )
        x = x + a
        x = x + MLPBlock(cfg, name="mlp")(LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_2")(x), deterministic)
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
        mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        return mask
    q_pos = cache_index + jnp.arange(T)[:, None]
    mask = (jnp.arange(S)[None, :] <= q_pos)[None, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :].astype(bool)
    return mask


class GPT2(nn.Module):
    """GPT2LMHeadModel. Returns float logits over the (possibly padded) vocab; padded ids are masked."""

    cfg: ModelConfig

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
        block = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
        self.h = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, dtype)
        self.drop = nn.Dropout(cfg.embd_pdrop)

    def hidden(self, tokens, positions=None, segment_ids=None, *, deterministic=True,
               cache: Cache | None = None, cache_index=None, kv_valid=None):
        """Final hidden states (B,T,D) in the compute dtype, and the updated cache (or None)."""
        B, T = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(T)[None], (B, T))
        x = self.wte(tokens) + self.wpe(positions)
        x = self.drop(x, deterministic=deterministic)
        S = None if cache is None else cache[0]["k"].shape[1]
        mask = attention_mask(T, segment_ids, kv_valid, cache_index, S)
        new_cache = []
        for i, block in enumerate(self.h):
            x, c = block(x, mask, deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(c)
        return self.ln_f(x), (tuple(new_cache) if cache is not None else None)

    def logits(self, h: jax.Array) -> jax.Array:
        """Tied LM head: (B,T,D) @ wte^T -> (B,T,V_padded) float32, padded ids at -1e30."""
        logits = self.wte.attend(h).astype(jnp.float32)
        if self.cfg.padded_vocab != self.cfg.vocab_size:
            valid = jnp.arange(self.cfg.padded_vocab) < self.cfg.vocab_size
            logits = jnp.where(valid, logits, _NEG)
        return logits

    def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic=True,
                 cache: Cache | None = None, cache_index=None, kv_valid=None):
        h, new_cache = self.hidden(tokens, positions, segment_ids, deterministic=deterministic,
                                   cache=cache, cache_index=cache_index, kv_valid=kv_valid)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    """Zeroed KV cache for decoding, in the compute dtype."""
    K = cfg.n_embd // cfg.n_head
    shape = (batch, max_len, cfg.n_head, K)
    dt = _dtype(cfg.dtype)
    return tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.n_layer))


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Boxed (nn.Partitioned) parameters; call under jax.eval_shape for an abstract init."""
    model = GPT2(cfg)
    tokens = jnp.zeros((1, min(seq_len, cfg.n_positions)), jnp.int32)
    return model.init(rng, tokens)["params"]


def abstract_params(cfg: ModelConfig, *, boxed: bool = False):
    """Parameter shapes/dtypes (and logical axes when boxed) without allocating anything."""
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return tree if boxed else nn.unbox(tree)
