"""The model-family seam: everything outside `flax_gpt/model/` that needs to know which model it
runs asks here, by `model.family`, and never names a family's modules or parameters itself.

A `Family` gives, for a `ModelConfig`: its Flax module (the same interface for every family:
`hidden`, `head`, `logits`, `__call__` with positions, segment ids and a decode cache), parameter
init (concrete or abstract, boxed with logical axes), the decode cache and the decoding layout of
the parameters, FLOPs per token and parameter count, and the Hugging Face conversion both ways
(config.json and state dict). The weight-decay rule is one rule by leaf name that serves every
family (`train/optim.decay_mask`); presets are `presets.MODEL_PRESETS` entries naming their family.

Adding a family is a module, its HF name map, and one `Family(...)` entry below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax

from flax_gpt.config import ModelConfig
from flax_gpt.errors import HFError
from flax_gpt.model import flops, gpt2, hf, llama, llama_hf
from flax_gpt.presets import GPT2_EOS_ID, MODEL_PRESETS


@dataclass(frozen=True)
class Family:
    name: str
    label: str  # as the model card names it
    module_class: type  # a flax Module taking (cfg, transposed_kernels)
    init_params: Callable  # (cfg, rng) -> boxed params
    init_cache: Callable  # (cfg, batch, max_len) -> cache
    decoding_params: Callable  # (params, cfg) -> params laid out for decoding, with "head" (D, V)
    head_embedding: Callable  # (params, cfg) -> the LM head (V_padded, D) of a params tree
    flops_per_token: Callable  # (cfg, seq_len) -> training model FLOPs per token
    param_count: Callable  # (cfg) -> parameters as built
    hf_model_type: str  # config.json's model_type
    hf_architecture: str  # the transformers class an export loads as
    to_hf_state_dict: Callable  # (params, cfg) -> {HF name: numpy array}
    from_hf_state_dict: Callable  # (sd, cfg, template) -> params
    hf_config: Callable  # (cfg, eos_id) -> config.json dict
    config_from_hf: Callable  # (config.json dict, **run overrides) -> ModelConfig

    def module(self, cfg: ModelConfig, *, transposed_kernels: bool = False) -> nn.Module:
        return self.module_class(cfg, transposed_kernels)

    def abstract_params(self, cfg: ModelConfig, *, boxed: bool = False):
        """Parameter shapes/dtypes (and logical axes when boxed) without allocating anything."""
        tree = jax.eval_shape(lambda: self.init_params(cfg, jax.random.key(0)))
        return tree if boxed else nn.unbox(tree)

    @property
    def presets(self) -> tuple[str, ...]:
        return tuple(n for n, p in MODEL_PRESETS.items() if p.get("family", "gpt2") == self.name)


def _gpt2_hf_config(cfg: ModelConfig, eos_id: int | None = None) -> dict:
    return hf.hf_config_dict(cfg, GPT2_EOS_ID if eos_id is None else eos_id)


def _llama_hf_config(cfg: ModelConfig, eos_id: int | None = None) -> dict:
    # Our tokenizers have one separator, EOS, which also begins a document (as GPT-2's does).
    return llama_hf.hf_config_dict(cfg, bos_id=eos_id, eos_id=eos_id)


_LLAMA_ARCH = [f.name for f in dataclasses.fields(llama.LlamaConfig)]


def _llama_config_from_hf(hf_cfg: dict, **overrides: Any) -> ModelConfig:
    """config.json -> ModelConfig of family llama (checked by llama_hf), with run fields overridden."""
    lc = llama_hf.model_config_from_hf(hf_cfg, **{k: v for k, v in overrides.items() if k in _LLAMA_ARCH})
    rest = {k: v for k, v in overrides.items() if k not in _LLAMA_ARCH}
    preset = llama_hf.preset_of(lc) or FAMILIES["llama"].presets[0]
    return ModelConfig(family="llama", preset=preset, **{k: getattr(lc, k) for k in _LLAMA_ARCH},
                       embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, **rest)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2", label="GPT-2", module_class=gpt2.GPT2, init_params=gpt2.init_params, init_cache=gpt2.init_cache,
        decoding_params=gpt2.decoding_params, head_embedding=gpt2.head_embedding,
        flops_per_token=flops.flops_per_token, param_count=flops.param_count,
        hf_model_type="gpt2", hf_architecture="GPT2LMHeadModel", to_hf_state_dict=hf.to_hf_state_dict,
        from_hf_state_dict=hf.from_hf_state_dict, hf_config=_gpt2_hf_config, config_from_hf=hf.model_config_from_hf),
    "llama": Family(
        name="llama", label="Llama-architecture", module_class=llama.Llama, init_params=llama.init_params,
        init_cache=llama.init_cache,
        decoding_params=llama.decoding_params, head_embedding=llama.head_embedding,
        flops_per_token=llama.flops_per_token, param_count=llama.param_count,
        hf_model_type="llama", hf_architecture="LlamaForCausalLM", to_hf_state_dict=llama_hf.to_hf_state_dict,
        from_hf_state_dict=llama_hf.from_hf_state_dict, hf_config=_llama_hf_config,
        config_from_hf=_llama_config_from_hf),
}


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.family]


def model(cfg: ModelConfig, *, transposed_kernels: bool = False) -> nn.Module:
    """The Flax module of `cfg`'s family."""
    return family_of(cfg).module(cfg, transposed_kernels=transposed_kernels)


def abstract_params(cfg: ModelConfig, *, boxed: bool = False):
    return family_of(cfg).abstract_params(cfg, boxed=boxed)


def init_params(cfg: ModelConfig, rng: jax.Array):
    """Boxed (nn.Partitioned) parameters of `cfg`'s family."""
    return family_of(cfg).init_params(cfg, rng)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return family_of(cfg).flops_per_token(cfg, seq_len)


def param_count(cfg: ModelConfig) -> int:
    return family_of(cfg).param_count(cfg)


def family_of_hf(hf_cfg: dict) -> Family:
    """The family of an HF config.json, by its model_type."""
    kind = hf_cfg.get("model_type")
    found = next((f for f in FAMILIES.values() if f.hf_model_type == kind), None)
    if found is None:
        known = ", ".join(f"{f.hf_model_type} ({f.hf_architecture})" for f in FAMILIES.values())
        raise HFError(f"config.json has model_type={kind!r}; flax_gpt imports {known}")
    return found


def config_from_hf(hf_cfg: dict, **overrides: Any) -> ModelConfig:
    """An HF config.json dict -> our ModelConfig, its family from `model_type`."""
    fam = family_of_hf(hf_cfg)
    try:
        return fam.config_from_hf(hf_cfg, **overrides)
    except KeyError as e:
        raise HFError(f"config.json of model_type={fam.hf_model_type!r} has no {e.args[0]!r}; it is not a "
                      f"complete {fam.hf_architecture} config") from None


def load_hf(src: str, template_fn: Callable | None = None, **model_overrides: Any) -> tuple[ModelConfig, dict]:
    """(ModelConfig, numpy params) from an HF folder or Hub id of any family (by config.json's
    model_type). `template_fn(cfg)` gives the params shapes to fill (default: the family's abstract
    init), so our vocab padding applies to the imported weights."""
    hf_cfg, sd = hf.read_hf_folder(hf.resolve_source(src))
    cfg = config_from_hf(hf_cfg, **model_overrides)
    fam = family_of(cfg)
    template = template_fn(cfg) if template_fn is not None else fam.abstract_params(cfg)
    return cfg, fam.from_hf_state_dict(sd, cfg, template)


def to_hf(params, cfg: ModelConfig, eos_id: int | None = None) -> tuple[dict, dict]:
    """(config.json dict, state dict of numpy arrays) of our params, as transformers reads them."""
    fam = family_of(cfg)
    return fam.hf_config(cfg, eos_id), fam.to_hf_state_dict(params, cfg)
