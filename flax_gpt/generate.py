"""Sampling from a model of any family with a KV cache, compiled once per shape bucket.

Layout of one call (B rows, T prompt slots, S = T + max_new_tokens cache slots):

    cache slot   0 ........ T-1 | T ......... S-1
    row b        pad pad p0 p1 p2 | n0 n1 n2 ...      (prompts left-padded to T)

Left padding puts every prompt's last token in slot T-1, so one prefill call yields every row's
next-token logits, and decode step i writes slot T+i for all rows at once. Each row's positions
count from its own first real token (so a padded prompt sees exactly the position embeddings it
would see alone) and `kv_valid` hides the pad slots from attention.

Shapes are bucketed so a few compiles serve many calls: T is a power of two >= 16 (shrunk to
fit n_positions), B a power of two; `max_new_tokens`, `top_k` and the greedy/top-p switches are
static; temperature, top-p, EOS id and the seed are traced and never recompile. Prefill and the
`lax.while_loop` decode loop live in one jitted function, which stops once every row has emitted
EOS (finished rows keep emitting EOS, which is stripped on the host).

Decoding reads the weights in the layout a matrix-vector product reads fastest (see
`decoding_params`), made once per parameter array and reused across calls; the model itself is
the family's `hidden` with `transposed_kernels=True` and the family's decode cache.

Sharded parameters: nothing here names a mesh. Pass parameters placed on any mesh (e.g. from
`RunDir.load_params`) and jit derives the computation's shardings from its inputs.
`load_model` loads what the sampler needs from a run directory or an HF folder.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt.config import ModelConfig
from flax_gpt.data.tokenizer import Tokenizer, load_tokenizer
from flax_gpt.errors import ConfigError
from flax_gpt.model.family import family_of, load_hf, model
from flax_gpt.model.hf import resolve_source
from flax_gpt.presets import GPT2_EOS_ID, GPT2_VOCAB_SIZE
from flax_gpt.train.run_dir import RunDir

MIN_PROMPT_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B,length) int32 with prompts right-aligned, prompt lengths (B,) int32)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    lens = np.array([len(p) for p in prompts], np.int32)
    for b, p in enumerate(prompts):
        if len(p):
            tokens[b, length - len(p):] = p
    return tokens, lens


# ----------------------------------------------------------------------------- model calls


def _last_hidden(module: nn.Module, tokens, positions, cache, cache_index, kv_valid):
    h, cache = module.hidden(tokens, positions, cache=cache, cache_index=cache_index, kv_valid=kv_valid)
    return h[:, -1], cache


def decoding_params(params, cfg: ModelConfig) -> dict:
    """The parameters laid out for decoding (the family's `decoding_params`): every block kernel
    stored (out, in), which a matrix-vector product reads fastest, and "head" the (D, V) matrix of
    the real vocab rows in the compute dtype (so sampling can never pick a padding id)."""
    return family_of(cfg).decoding_params(params, cfg)


# The transposes read and write every weight (~0.2 s for GPT-2 on CPU), so they are made once per
# parameter array, not once per call: keyed by the embedding array's identity (held weakly) and
# the config fields that shape them. Costs one extra copy of the weights in memory.
_LAYOUTS: dict[tuple, tuple[weakref.ref, dict]] = {}
_decoding_params_jit = jax.jit(decoding_params, static_argnames=("cfg",))


def cached_decoding_params(params, cfg: ModelConfig) -> dict:
    emb = family_of(cfg).head_embedding(params, cfg)
    key = (id(emb), cfg.vocab_size, cfg.dtype)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is emb:
        return hit[1]
    out = _decoding_params_jit(params, cfg=cfg)
    if len(_LAYOUTS) >= 4:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (weakref.ref(emb), out)
    weakref.finalize(emb, _LAYOUTS.pop, key, None)  # the copy goes when the parameters go
    return out


def _model_params(dparams: dict) -> dict:
    return {k: v for k, v in dparams.items() if k != "head"}


def _logits(h: jax.Array, head: jax.Array) -> jax.Array:
    return jnp.dot(h.astype(head.dtype), head).astype(jnp.float32)  # (B,V) float32, as the model's logits


def prefill(dparams, cfg: ModelConfig, tokens: jax.Array, prompt_lens: jax.Array, cache_len: int):
    """Run left-padded prompts (B,T) through the model into a fresh cache of `cache_len` slots.

    `dparams` is `decoding_params(params, cfg)`. Returns (next-token logits (B,V), cache,
    kv_valid (B,S)). Only the last query's logits are computed: prefill never materialises (B,T,V).
    """
    B, T = tokens.shape
    pad = T - prompt_lens
    kv_valid = jnp.arange(cache_len)[None, :] >= pad[:, None]
    positions = jnp.maximum(jnp.arange(T)[None, :] - pad[:, None], 0)
    cache = family_of(cfg).init_cache(cfg, B, cache_len)
    h, cache = model(cfg, transposed_kernels=True).apply({"params": _model_params(dparams)}, tokens, positions,
                                                         cache, 0, kv_valid, method=_last_hidden)
    return _logits(h, dparams["head"]), cache, kv_valid


def decode_step(dparams, cfg: ModelConfig, token: jax.Array, positions: jax.Array, cache, cache_index, kv_valid):
    """One token per row (B,) at `positions` (B,), written to cache slot `cache_index`.

    Returns (next-token logits (B,V), updated cache)."""
    h, cache = model(cfg, transposed_kernels=True).apply({"params": _model_params(dparams)}, token[:, None],
                                                         positions[:, None], cache, cache_index, kv_valid,
                                                         method=_last_hidden)
    return _logits(h, dparams["head"]), cache


# ----------------------------------------------------------------------------- filtering


def _top_p_keep_sorted(sorted_logits: jax.Array, p) -> jax.Array:
    """Mask over descending logits: the smallest prefix whose probability reaches p (>= 1 token).

    A token is kept when the mass strictly above it is < p: transformers' TopPLogitsWarper rule."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return (mass_above < p).at[..., 0].set(True)


def filter_top_p(logits: jax.Array, p) -> jax.Array:
    """Nucleus filtering: logits outside the top-p set become -inf."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    keep = _top_p_keep_sorted(sorted_logits, p)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_p, *, top_k: int, greedy: bool,
                  use_top_p: bool) -> jax.Array:
    """Next tokens (B,) from logits (B,V): temperature, then top-k, then top-p (transformers' order)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        # Sample within the k candidates: top_k already sorts them, so top-p needs no vocab sort.
        vals, idx = jax.lax.top_k(logits, top_k)  # (B,k) descending
        if use_top_p:
            vals = jnp.where(_top_p_keep_sorted(vals, top_p), vals, -jnp.inf)
        choice = jax.random.categorical(key, vals, axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if use_top_p:
        logits = filter_top_p(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the sampler


def _generate(dparams, tokens, prompt_lens, done, key, temperature, top_p, eos_id, *, cfg: ModelConfig,
              max_new_tokens: int, top_k: int, greedy: bool, use_top_p: bool):
    """(B, max_new_tokens) int32 new tokens; rows that finished hold eos_id from then on."""
    B, T = tokens.shape
    pick = functools.partial(sample_logits, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                             use_top_p=use_top_p)
    logits, cache, kv_valid = prefill(dparams, cfg, tokens, prompt_lens, T + max_new_tokens)
    key, sub = jax.random.split(key)
    tok = jnp.where(done, eos_id, pick(logits, sub))
    done = done | (tok == eos_id)
    out = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(tok)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        # Step i feeds token i-1 (sequence position prompt_len+i-1, cache slot T+i-1), samples token i.
        i, cache, tok, done, out, key = carry
        logits, cache = decode_step(dparams, cfg, tok, prompt_lens + i - 1, cache, T + i - 1, kv_valid)
        key, sub = jax.random.split(key)
        tok = jnp.where(done, eos_id, pick(logits, sub))
        done = done | (tok == eos_id)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        return i + 1, cache, tok, done, out, key

    carry = (jnp.int32(1), cache, tok, done, out, key)
    return jax.lax.while_loop(cond, body, carry)[4]


@functools.cache
def compiled_sampler(backend: str):
    """`_generate` jitted for a backend. On CPU, copy insertion gets region analysis: without it
    XLA cannot tell that the decode loop updates each cache buffer in place, and copies them all
    on every step (about 5% of a distilgpt2 step at batch 1)."""
    options = {"xla_cpu_copy_insertion_use_region_analysis": True} if backend == "cpu" else None
    return jax.jit(_generate, static_argnames=("cfg", "max_new_tokens", "top_k", "greedy", "use_top_p"),
                   compiler_options=options)


def _check_lengths(cfg: ModelConfig, longest: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if longest + max_new_tokens > cfg.n_positions:
        raise ConfigError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"n_positions={cfg.n_positions}; shorten the prompt or lower --max-new-tokens to "
            f"{max(cfg.n_positions - longest, 0)}")


def _to_device(params):
    return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), params)


def generate_tokens(params, cfg: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                    seed: int = 0, eos_id: int = GPT2_EOS_ID) -> list[list[int]]:
    """New tokens for each prompt (EOS and anything after it stripped).

    An empty prompt is conditioned on EOS (<|endoftext|>), GPT-2's document separator.
    `temperature=0` means greedy. Rows are sampled independently from one key (`jax.random.key(seed)`):
    the same seed and batch give the same samples.
    """
    if not prompts:
        return []
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                          f"(got {temperature}, {top_p}, {top_k})")
    greedy = greedy or temperature == 0
    prompts = [list(p) if len(p) else [eos_id] for p in prompts]
    longest = max(len(p) for p in prompts)
    _check_lengths(cfg, longest, max_new_tokens)
    T = min(bucket(longest, MIN_PROMPT_BUCKET), cfg.n_positions - max_new_tokens)
    B = bucket(len(prompts))
    padded = prompts + [[eos_id]] * (B - len(prompts))  # filler rows start finished
    tokens, lens = left_pad(padded, T, eos_id)
    done = np.arange(B) >= len(prompts)
    params = _to_device(params)
    sampler = compiled_sampler(jax.default_backend())
    out = sampler(cached_decoding_params(params, cfg), tokens, lens, done, jax.random.key(seed),
                  np.float32(temperature or 1.0), np.float32(top_p), np.int32(eos_id), cfg=cfg,
                  max_new_tokens=int(max_new_tokens), top_k=int(top_k) if not greedy else 0, greedy=bool(greedy),
                  use_top_p=bool(top_p < 1.0 and not greedy))
    out = np.asarray(jax.device_get(out))[: len(prompts)]
    result = []
    for row in out:
        stop = np.flatnonzero(row == eos_id)
        result.append(row[: stop[0] if stop.size else len(row)].tolist())
    return result


def generate_text(params, cfg: ModelConfig, tokenizer, prompts: list[str], *, num_samples: int = 1, **kw) -> list[str]:
    """prompt + continuation, `num_samples` per prompt, prompt-major order (all of prompt 0 first)."""
    if num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1 (got {num_samples})")
    kw.setdefault("eos_id", tokenizer.eos_id)
    ids = tokenizer.encode_batch(list(prompts))
    rows = [p for p in ids for _ in range(num_samples)]
    new = generate_tokens(params, cfg, rows, **kw)
    texts = [p for p in prompts for _ in range(num_samples)]
    return [t + tokenizer.decode(n) for t, n in zip(texts, new)]


@dataclasses.dataclass
class LoadedModel:
    """Parameters, model config and tokenizer of a run's checkpoint or an HF folder."""

    params: dict
    cfg: ModelConfig
    tokenizer: Tokenizer
    folder: Path | None = None  # the HF folder it came from, if any
    run_dir: str | Path | None = None
    step: int | None = None

    def generate(self, prompts: list[str], *, num_samples: int = 1, **kw) -> list[str]:
        return generate_text(self.params, self.cfg, self.tokenizer, prompts, num_samples=num_samples, **kw)


def folder_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The folder's own tokenizer (GPT-2's own files are read by the fast offline GPT-2 tokenizer),
    else GPT-2's when the vocab is GPT-2's."""
    gpt2 = load_tokenizer("gpt2")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() and \
            (folder / "vocab.json").read_bytes() == gpt2.vocab_path.read_bytes() and \
            (folder / "merges.txt").read_bytes() == gpt2.merges_path.read_bytes():
        return gpt2
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return load_tokenizer(str(folder))
    if vocab_size == GPT2_VOCAB_SIZE:
        return gpt2
    raise ConfigError(f"{folder} has no tokenizer files and vocab_size={vocab_size} is not GPT-2's; "
                      "add the tokenizer (tokenizer.json) to the folder")


def load_model(*, run_dir: str | Path | None = None, hf: str | None = None, step=None,
               dtype: str = "float32") -> LoadedModel:
    """A run directory's checkpoint (`step`: N, latest or best) or an HF folder / Hub id."""
    if hf is not None:
        if step is not None:
            raise ConfigError("--step selects a checkpoint of a run directory; it does not apply to --hf")
        folder = resolve_source(str(hf))
        cfg, params = load_hf(str(folder), dtype=dtype)
        return LoadedModel(jax.device_put(params), cfg, folder_tokenizer(folder, cfg.vocab_size), folder=folder)
    run_cfg, params, chosen, _ = RunDir(run_dir).load_params(step)
    cfg = dataclasses.replace(run_cfg.model, remat="none")
    return LoadedModel(params, cfg, load_tokenizer(run_cfg.data.tokenizer), run_dir=run_dir, step=chosen)
