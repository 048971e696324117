"""The Llama architecture in Flax linen, laid out as Hugging Face's LlamaForCausalLM.

Pre-norm blocks with RMSNorm, rotary positions (HF's rotate_half convention: the two halves of a
head, not interleaved pairs), a SwiGLU MLP, grouped-query attention (n_kv_head key/value heads,
each shared by n_head / n_kv_head query heads) and no biases: the shape of SmolLM2, TinyLlama and
most small open models. Parameter names follow HF (`embed_tokens`, `layers_{i}.input_layernorm`,
`self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, `norm`,
`lm_head`); kernels are (in, out), the transpose of HF's nn.Linear, so `llama_hf.py` transposes.

The module has GPT2's interface: `hidden` / `logits` / `__call__` take the same arguments
(positions, segment ids, a decode cache) and return the same things, `head()` is the (V, D)
matrix the chunked loss takes, and `init_cache` / `transpose_kernels` / `decoding_params` /
`init_params` / `abstract_params` mirror `gpt2.py`. Llama has no dropout: `deterministic` is taken
and ignored. Parameters are float32; `cfg.dtype` is the compute dtype (RMSNorm statistics and
rotary tables stay float32).

Dimension letters: B batch, T sequence (queries), S keys/cache length, D model width, H query
heads, G key/value heads, R = H / G query heads per key/value head, K head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt.errors import ConfigError
from flax_gpt.model.attention import attend
from flax_gpt.model.gpt2 import (  # shared layers
    _NEG,
    EMBED,
    HEADS_OUT,
    MLP,
    NORM,
    QKV,
    REMAT_POLICIES,
    VOCAB,
    _dtype,
    _matmul,
    _param,
    attention_mask,
    embed_rows,
    mask_padded_vocab,
    transpose_kernels,
)
from flax_gpt.presets import MODEL_PRESETS
from flax_gpt.sharding import constrain

Cache = tuple  # one {"k": (B,G,K,S), "v": (B,G,S,K)} dict per layer

@dataclass(frozen=True)
class LlamaConfig:
    """What the Llama module reads. The names are ModelConfig's where the meaning is the same
    (`layer_norm_epsilon` is RMSNorm's epsilon, `n_inner` the SwiGLU width), so a ModelConfig
    that gains `n_kv_head`, `head_dim`, `rope_theta` and `tie_word_embeddings` can be passed as is."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int = 0  # 0: n_head (plain multi-head attention)
    head_dim: int = 0  # 0: n_embd // n_head
    vocab_size: int = 256
    n_positions: int = 2048  # HF max_position_embeddings; rotary positions have no table
    n_inner: int = 0  # 0: 4 * n_embd (a Llama config always names it)
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    pad_vocab_to: int = 0

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_to
        return self.vocab_size if m <= 0 else -(-self.vocab_size // m) * m

    def validate(self) -> None:
        for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive (got {getattr(self, k)})")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={self.kv_heads}; "
                              "each key/value head must serve the same number of query heads")
        if not self.head_dim and self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                              "choose a head count that divides the width or set model.head_dim")
        if self.head_size % 2:
            raise ConfigError(f"rotary positions need an even head dim (got {self.head_size})")


# The Llama presets of presets.py, as LlamaConfig fields.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in p.items() if k in LlamaConfig.__dataclass_fields__}
    for name, p in MODEL_PRESETS.items() if p.get("family") == "llama"}


def _embed(cfg, dtype) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED))
    return nn.Embed(cfg.padded_vocab, cfg.n_embd, dtype=dtype, param_dtype=jnp.float32, embedding_init=init)


class Dense(nn.Module):
    """y = x @ kernel, no bias, kernel stored (in, out); `transposed=True` reads it stored (out, in)."""

    features: int
    axes: tuple[str, str]
    dtype: Any
    transposed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)  # HF's initializer_range, every Linear alike
        if self.transposed:
            kernel = _param(self, "kernel", init, (self.features, x.shape[-1]), self.axes[::-1])
            dims = (((x.ndim - 1,), (1,)), ((), ()))
            return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
        kernel = _param(self, "kernel", init, (x.shape[-1], self.features), self.axes)
        return _matmul(x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
    """x / rms(x) * scale, the statistics in float32; normalised x is cast to the compute dtype
    before the scale multiplies it, in HF's order."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (NORM,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_tables(positions: jax.Array, K: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B,T,K) float32 of HF's default rotary embedding: frequency theta^(-2j/K) for
    j < K/2, repeated over both halves of the head."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B,T,K/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B,T,H,K) rotated: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def cached_attention(q, k, v, mask, layer_cache, cache_index, dtype):
    """Decode: q (B,T,H,K) over the cache as it was plus this call's k, v (B,T,G,K), written at
    cache_index. Each key/value head serves R query heads (q grouped as (B,T,G,R,K)), so the cache
    holds G heads only. As in GPT2's decode, the old cache is read and the new slots written once."""
    B, T, H, K = q.shape
    G, S = k.shape[2], layer_cache["v"].shape[2]
    qg = q.reshape(B, T, G, H // G, K)
    k_new = k.transpose(0, 2, 3, 1).astype(layer_cache["k"].dtype)  # (B,G,K,T)
    v_new = v.transpose(0, 2, 1, 3).astype(layer_cache["v"].dtype)  # (B,G,T,K)
    mask = jnp.concatenate([mask & (jnp.arange(S) < cache_index),  # filled slots of the old cache
                            jax.lax.dynamic_slice_in_dim(mask, cache_index, T, axis=3)], axis=3)
    scores = jnp.concatenate(
        [jnp.einsum("btgrk,bgks->bgrts", qg, kk.astype(dtype), preferred_element_type=jnp.float32)
         for kk in (layer_cache["k"], k_new)], axis=-1)  # (B,G,R,T,S+T)
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores / math.sqrt(K), _NEG), axis=-1).astype(dtype)
    out = (jnp.einsum("bgrts,bgsk->btgrk", probs[..., :S], layer_cache["v"].astype(dtype))
           + jnp.einsum("bgrts,bgsk->btgrk", probs[..., S:], v_new.astype(dtype)))
    new_cache = {"k": jax.lax.dynamic_update_slice(layer_cache["k"], k_new, (0, 0, 0, cache_index)),
                 "v": jax.lax.dynamic_update_slice(layer_cache["v"], v_new, (0, 0, cache_index, 0))}
    return out.reshape(B, T, H, K), new_cache


class Attention(nn.Module):
    cfg: Any
    transposed_kernels: bool = False

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache=None, cache_index=None, segment_ids=None):
        cfg, dtype, tk = self.cfg, _dtype(self.cfg.dtype), self.transposed_kernels
        B, T, _ = x.shape
        H, G, K = cfg.n_head, cfg.kv_heads, cfg.head_size
        q = Dense(H * K, (EMBED, QKV), dtype, tk, name="q_proj")(x).reshape(B, T, H, K)
        k = Dense(G * K, (EMBED, QKV), dtype, tk, name="k_proj")(x).reshape(B, T, G, K)
        v = Dense(G * K, (EMBED, QKV), dtype, tk, name="v_proj")(x).reshape(B, T, G, K)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new_cache = None
        if layer_cache is not None:
            out, new_cache = cached_attention(q, k, v, mask, layer_cache, cache_index, dtype)
        else:  # `attend` takes grouped k, v (G heads) as they are, on every kernel
            kernel = "xla" if self.is_initializing() else cfg.attention
            out = attend(q, k, v, segment_ids=segment_ids, kernel=kernel)
        out = Dense(cfg.n_embd, (HEADS_OUT, EMBED), dtype, tk, name="o_proj")(out.reshape(B, T, H * K))
        return out, new_cache


class MLPBlock(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: Any
    transposed_kernels: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, dtype, tk = self.cfg, _dtype(self.cfg.dtype), self.transposed_kernels
        gate = Dense(cfg.d_ff, (EMBED, MLP), dtype, tk, name="gate_proj")(x)
        up = Dense(cfg.d_ff, (EMBED, MLP), dtype, tk, name="up_proj")(x)
        return Dense(cfg.n_embd, (MLP, EMBED), dtype, tk, name="down_proj")(jax.nn.silu(gate) * up)


class Block(nn.Module):
    cfg: Any
    transposed_kernels: bool = False

    @nn.compact
    def __call__(self, x, rope, mask, deterministic: bool, layer_cache=None, cache_index=None, segment_ids=None):
        cfg, dtype, tk = self.cfg, _dtype(self.cfg.dtype), self.transposed_kernels
        eps = cfg.layer_norm_epsilon
        a, new_cache = Attention(cfg, tk, name="self_attn")(
            RMSNorm(eps, dtype, name="input_layernorm")(x), rope, mask, layer_cache, cache_index, segment_ids)
        x = x + a
        x = x + MLPBlock(cfg, tk, name="mlp")(RMSNorm(eps, dtype, name="post_attention_layernorm")(x))
        return x, new_cache


class Llama(nn.Module):
    """LlamaForCausalLM. Returns float32 logits over the (possibly padded) vocab; padded ids are masked.

    `transposed_kernels=True` takes every block kernel stored (out, in), as GPT2 (for decoding)."""

    cfg: Any
    transposed_kernels: bool = False

    def setup(self):
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        self.embed_tokens = _embed(cfg, dtype)
        block = Block if cfg.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                                                           static_argnums=(4,))
        self.layers = [block(cfg, self.transposed_kernels, name=f"layers_{i}") for i in range(cfg.n_layer)]
        self.norm = RMSNorm(cfg.layer_norm_epsilon, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _embed(cfg, dtype)  # (V,D) as HF's lm_head.weight and the loss's head

    def hidden(self, tokens, positions=None, segment_ids=None, *, deterministic=True,
               cache: Cache | None = None, cache_index=None, kv_valid=None):
        """Final hidden states (B,T,D) in the compute dtype, and the updated cache (or None)."""
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(T)[None], (B, T))
        dtype = _dtype(cfg.dtype)
        rope = tuple(t.astype(dtype) for t in rope_tables(positions, cfg.head_size, cfg.rope_theta))
        x = constrain(embed_rows(self.embed_tokens.embedding, tokens, dtype), "residual")
        mask = None if cache is None else attention_mask(T, segment_ids, kv_valid, cache_index,
                                                         cache[0]["v"].shape[2])
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, rope, mask, deterministic, None if cache is None else cache[i], cache_index,
                         segment_ids)
            x = constrain(x, "residual")
            new_cache.append(c)
        return self.norm(x), (tuple(new_cache) if cache is not None else None)

    def head(self) -> jax.Array:
        """The LM head (V_padded, D) float32: `embed_tokens` when tied, else `lm_head`."""
        return (self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head).embedding

    def logits(self, h: jax.Array) -> jax.Array:
        """(B,T,D) @ head^T -> (B,T,V_padded) float32, padded ids at -1e30."""
        module = self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        return mask_padded_vocab(constrain(module.attend(h).astype(jnp.float32), "logits"), self.cfg)

    def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic=True,
                 cache: Cache | None = None, cache_index=None, kv_valid=None):
        h, new_cache = self.hidden(tokens, positions, segment_ids, deterministic=deterministic,
                                   cache=cache, cache_index=cache_index, kv_valid=kv_valid)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg, batch: int, max_len: int) -> Cache:
    """Zeroed KV cache for decoding, in the compute dtype: G key/value heads per layer."""
    K, G, dt = cfg.head_size, cfg.kv_heads, _dtype(cfg.dtype)
    keys, values = (batch, G, K, max_len), (batch, G, max_len, K)
    return tuple({"k": jnp.zeros(keys, dt), "v": jnp.zeros(values, dt)} for _ in range(cfg.n_layer))


def head_embedding(params, cfg) -> jax.Array:
    """The LM head (V_padded, D) of a params tree: `embed_tokens` when tied, else `lm_head`."""
    return params["embed_tokens" if cfg.tie_word_embeddings else "lm_head"]["embedding"]


def decoding_params(params, cfg) -> dict:
    """As generate.decoding_params: block kernels transposed, and "head" the (D, V) matrix of the
    real vocab rows in the compute dtype."""
    head = head_embedding(params, cfg)[: cfg.vocab_size].T.astype(jnp.dtype(cfg.dtype))
    return {**transpose_kernels(params), "head": head}


def init_params(cfg, rng: jax.Array, seq_len: int = 8):
    """Boxed (nn.Partitioned) parameters; call under jax.eval_shape for an abstract init."""
    tokens = jnp.zeros((1, min(seq_len, cfg.n_positions)), jnp.int32)
    return Llama(cfg).init(rng, tokens)["params"]


def abstract_params(cfg, *, boxed: bool = False):
    """Parameter shapes/dtypes (and logical axes when boxed) without allocating anything."""
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return tree if boxed else nn.unbox(tree)


def decay_mask(params, *, decay_embeddings: bool = True):
    """True where AdamW decays: every weight matrix (`kernel`); the token embedding and an untied
    `lm_head` (both `embedding`, the input and output vocabulary tables) when `decay_embeddings`;
    never the RMSNorm scales. GPT-2's rule read by leaf name, so one rule serves both families."""
    def decide(path, _):
        name = next((str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), "")
        return name == "kernel" or (name == "embedding" and decay_embeddings)

    return jax.tree_util.tree_map_with_path(decide, params)


# ----------------------------------------------------------------------------- FLOPs (flops.py's conventions)


def block_param_count(cfg) -> int:
    """Parameters of one block: q, k, v, o projections, the three SwiGLU matrices, two RMSNorm scales."""
    D, F, QK, KV = cfg.n_embd, cfg.d_ff, cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    return (D * QK + 2 * D * KV + QK * D) + 3 * D * F + 2 * D


def param_count(cfg) -> int:
    """All parameters as built (tied head counted once); equals LlamaForCausalLM.num_parameters()
    without vocab padding."""
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * cfg.padded_vocab * cfg.n_embd + cfg.n_layer * block_param_count(cfg) + cfg.n_embd


def flops_param_count(cfg) -> int:
    """N in 6*N: blocks + final norm + V*D for the head matmul (the embedding lookup costs nothing,
    tied or not); V the real vocabulary."""
    return cfg.n_layer * block_param_count(cfg) + cfg.n_embd + cfg.vocab_size * cfg.n_embd


def flops_per_token(cfg, seq_len: int) -> float:
    """Training model FLOPs per token: 6 * N + 12 * n_layer * seq_len * (n_head * head_dim), the
    attention term without causal halving (PaLM appendix B), as flops.flops_per_token. Grouped
    key/value heads shrink N, not the attention term: every query head still scores every key."""
    return float(6 * flops_param_count(cfg) + 12 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_size)
