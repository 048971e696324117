"""The one name map between our Flax Llama and Hugging Face's LlamaForCausalLM, both ways: config
(config.json) and state dict. Reads and writes the same arrays: kernels are transposed (ours
(in, out), HF's nn.Linear (out, in)), vocab padding is added on import and stripped on export, so
import -> export gives back the checkpoint bit for bit.

Reading a folder or Hub id (safetensors, the cache) is `hf.py`'s, shared by every family.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flax_gpt.errors import HFError
from flax_gpt.model.hf import flatten, read_hf_folder, resolve_source, unflatten
from flax_gpt.model.llama import LLAMA_PRESETS, LlamaConfig

# Ours -> HF leaf names: an RMSNorm "scale", a Dense "kernel" and an Embed "embedding" are all HF's "weight".
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Buffers older checkpoints saved that are not parameters (recomputed from rope_theta).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# HF LlamaConfig options this implementation does not reproduce, with the value it does.
_UNSUPPORTED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
_ARCH = ("n_layer", "n_embd", "n_head", "n_kv_head", "n_inner", "vocab_size", "n_positions", "rope_theta",
         "layer_norm_epsilon", "tie_word_embeddings")


def to_hf_name(path: str) -> str:
    """'layers_3.self_attn.q_proj.kernel' -> 'model.layers.3.self_attn.q_proj.weight';
    'lm_head.embedding' -> 'lm_head.weight'."""
    *mods, leaf = path.split(".")
    if mods[0] == "lm_head":
        return "lm_head." + _LEAF[leaf]
    if mods[0].startswith("layers_"):
        mods = ["layers", mods[0].removeprefix("layers_"), *mods[1:]]
    return "model." + ".".join([*mods, _LEAF[leaf]])


def _is_vocab_table(path: str) -> bool:
    return path in ("embed_tokens.embedding", "lm_head.embedding")


def to_hf_state_dict(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Our (unboxed) params -> HF state dict of numpy arrays. A tied head is not written (HF ties
    `lm_head.weight` to `model.embed_tokens.weight` on load); vocab padding is stripped."""
    out = {}
    for path, value in flatten(params).items():
        arr = np.asarray(value)
        if path.endswith(".kernel"):
            arr = np.ascontiguousarray(arr.T)
        elif _is_vocab_table(path):
            arr = arr[: cfg.vocab_size]
        out[to_hf_name(path)] = arr
    return out


def _check_head(sd: dict[str, np.ndarray], cfg: LlamaConfig) -> None:
    """A tied config's checkpoint may carry lm_head only as a copy of the embedding; drop it."""
    if not cfg.tie_word_embeddings:
        return
    head = sd.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, sd.get("model.embed_tokens.weight")):
        raise HFError("config.json says tie_word_embeddings=true but lm_head differs from embed_tokens; "
                      "set tie_word_embeddings=false in config.json")


def _import_array(path: str, arr: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    kernel = path.endswith(".kernel")
    hf_shape = tuple(np.shape(arr))
    arr = np.asarray(arr, dtype=np.float32)
    arr = arr.T if kernel else arr
    if _is_vocab_table(path) and arr.shape[0] < want[0]:
        # Padded vocab rows are zeros: never a real input id, and their logits are masked.
        arr = np.concatenate([arr, np.zeros((want[0] - arr.shape[0], arr.shape[1]), np.float32)])
    if arr.shape != want:
        raise HFError(f"weight '{to_hf_name(path)}' has shape {hf_shape} but the model expects "
                      f"{want[::-1] if kernel else want}; the checkpoint and model config disagree")
    return np.ascontiguousarray(arr)


def from_hf_state_dict(sd: dict[str, np.ndarray], cfg: LlamaConfig, template: dict) -> dict:
    """HF state dict -> our params tree, shaped like `template` (a params tree or its shapes)."""
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    _check_head(sd, cfg)
    flat = {}
    for path, tmpl in flatten(template).items():
        name = to_hf_name(path)
        if name not in sd:
            raise HFError(f"weight '{name}' is missing from the checkpoint; is it a Llama model of this shape?")
        flat[path] = _import_array(path, sd.pop(name), tuple(tmpl.shape))
    if sd:
        raise HFError(f"unexpected weights in the checkpoint: {sorted(sd)[:5]}; is it a Llama model?")
    return unflatten(flat)


def _rope_theta(hf: dict) -> float:
    """rope_theta from transformers 5's `rope_parameters` or the older top-level key; only the
    default (unscaled) rotary embedding is reproduced."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise HFError(f"rotary scaling rope_type={kind!r} is not supported by flax_gpt (only the default)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict, **overrides: Any) -> LlamaConfig:
    """An HF LlamaConfig dict (config.json) -> our LlamaConfig; `overrides` set run fields (dtype, ...)."""
    if hf.get("model_type") != "llama":
        raise HFError(f"config.json has model_type={hf.get('model_type')!r}, not 'llama'")
    for key, want in _UNSUPPORTED.items():
        if hf.get(key, want) != want:
            raise HFError(f"config option {key}={hf[key]!r} is not supported by flax_gpt (Llama uses {want!r})")
    H = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // H
    fields = {
        "n_layer": hf["num_hidden_layers"], "n_embd": hf["hidden_size"], "n_head": H,
        "n_kv_head": hf.get("num_key_value_heads") or H,
        "head_dim": 0 if head_dim * H == hf["hidden_size"] else head_dim,
        "vocab_size": hf["vocab_size"], "n_positions": hf.get("max_position_embeddings", 2048),
        "n_inner": hf["intermediate_size"], "layer_norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": _rope_theta(hf), "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    fields.update(overrides)
    cfg = LlamaConfig(**fields)
    cfg.validate()
    return cfg


def preset_of(cfg: LlamaConfig) -> str | None:
    """The name of the preset whose architecture `cfg` has, if any."""
    arch = {k: getattr(cfg, k) for k in _ARCH}
    return next((name for name, p in LLAMA_PRESETS.items() if {k: p.get(k, 0) for k in _ARCH} == arch), None)


def hf_config_dict(cfg: LlamaConfig, *, bos_id: int | None, eos_id: int | None) -> dict:
    """Our LlamaConfig -> a LlamaConfig dict for config.json. The rotary base is written both ways
    (transformers 5's `rope_parameters`, the older `rope_theta`) so either version reads it."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": cfg.n_layer, "hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "intermediate_size": cfg.d_ff,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.n_positions,
        "rms_norm_eps": cfg.layer_norm_epsilon, "hidden_act": "silu", "initializer_range": 0.02,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "use_cache": True, "torch_dtype": "float32",
    }


def load_hf(src: str, template_fn, **model_overrides: Any) -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, numpy params) from an HF folder or Hub id, as `hf.load_hf` for GPT-2.

    `template_fn(cfg)` returns the params shapes for a config (e.g. `llama.abstract_params`)."""
    hf_cfg, sd = read_hf_folder(resolve_source(src))
    cfg = model_config_from_hf(hf_cfg, **model_overrides)
    return cfg, from_hf_state_dict(sd, cfg, template_fn(cfg))
