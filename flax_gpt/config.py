"""Typed, frozen configuration: YAML presets plus `section.key=value` overrides.

Resolution order for every section: dataclass defaults < preset (model/optim only) < YAML file
< command-line overrides. The resolved config is what gets saved to `RUN_DIR/config.yaml`, so a
saved config always reloads to exactly the same values. This module never imports jax.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the problem and the fix."""


# Architecture presets. `tiny` exists for tests: small enough to compile in seconds on a CPU but
# still with the real GPT-2 vocabulary so the real tokenizer and export paths are exercised.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=256),
}

# `keras` reproduces transformers' TF `AdamWeightDecay` defaults (the usual Keras recipe):
# epsilon 1e-7, no clipping, no warmup.
OPTIM_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0),
    "keras": dict(b1=0.9, b2=0.999, eps=1e-7, clip_norm=0.0, warmup_steps=0),
}

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    vocab_size: int = 50257
    n_positions: int = 256
    n_inner: int = 0  # 0 means 4 * n_embd, as GPT-2
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False  # rematerialise each block in the backward pass
    attention: str = "xla"  # "xla" | "cudnn" (GPU only)
    pad_vocab_to: int = 0  # pad the embedding's vocab dim to a multiple of this (0 = off)
    init_from: str = ""  # Hub id, HF folder or run directory; "" = GPT-2's own init

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_to
        return self.vocab_size if m <= 0 else -(-self.vocab_size // m) * m

    def validate(self) -> None:
        _check_choice("model.preset", self.preset, tuple(MODEL_PRESETS))
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.attention", self.attention, ("xla", "cudnn"))
        for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive (got {getattr(self, k)})")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "choose a head count that divides the width"
            )


@dataclass(frozen=True)
class DataConfig:
    # "synthetic", a Hub dataset id (e.g. CShorten/ML-ArXiv-Papers), or local files: a path, a
    # glob, or a list of them (csv, json, jsonl, parquet, txt).
    source: Any = "synthetic"
    hf_split: str = "train"
    hf_revision: str = ""
    hf_name: str = ""  # dataset configuration name, if the Hub dataset has several
    text_column: str = "abstract"
    template: str = ""  # e.g. "{title}\n{abstract}"; overrides text_column when set
    normalize_whitespace: bool = True
    tokenizer: str = "gpt2"
    seq_len: int = 256
    val_fraction: float = 0.05
    split_seed: int = 0
    shards_dir: str = "data/shards"
    rows_per_shard: int = 8192
    packing: str = "pack"  # "pack" (concatenate with EOS) | "pad" (one document a row, pad/truncate)
    document_mask: bool = False  # segment ids + restarted positions so documents don't attend across
    synthetic_docs: int = 4000
    prefetch: int = 2

    def validate(self) -> None:
        _check_choice("data.packing", self.packing, ("pack", "pad"))
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2 (got {self.seq_len})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.rows_per_shard <= 0:
            raise ConfigError(f"data.rows_per_shard must be positive (got {self.rows_per_shard})")


@dataclass(frozen=True)
class OptimConfig:
    preset: str = "default"
    learning_rate: float = 5e-4
    warmup_steps: int = 0
    decay_steps: int = 1000  # Keras ExponentialDecay: lr * decay_rate ** (step / decay_steps)
    decay_rate: float = 1.0
    staircase: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_embeddings: bool = True  # apply weight decay to wte/wpe (biases and LayerNorms never)
    clip_norm: float = 1.0  # global-norm clipping; 0 disables it

    def validate(self) -> None:
        _check_choice("optim.preset", self.preset, tuple(OPTIM_PRESETS))
        if self.decay_steps <= 0:
            raise ConfigError(f"optim.decay_steps must be positive (got {self.decay_steps})")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be positive (got {self.learning_rate})")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/tiny"
    steps: int = 100  # 0 = derive from train.epochs and the training split size
    epochs: float = 1.0  # used only when train.steps is 0
    batch_size: int = 8  # global, in sequences
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 0  # 0 = evaluate only at the end
    eval_batch_size: int = 0  # 0 = train.batch_size
    log_every: int = 1
    progress: bool = True
    export_dir: str = ""  # export an HF folder here at the end of training ("" = no export)
    sample_prompts: list = field(default_factory=list)  # printed samples at the end of training
    sample_max_new_tokens: int = 48

    def validate(self) -> None:
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("train.batch_size and train.grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum}; pick a batch that splits into micro-batches"
            )
        if self.steps < 0:
            raise ConfigError(f"train.steps must be >= 0 (got {self.steps})")


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1 fills the devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh axis sizes must be positive or -1 (got {sizes})")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # 0 = only at the end (and on preemption)
    keep: int = 3
    keep_best: bool = True  # also keep the checkpoint with the best validation loss
    async_save: bool = True


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.data.seq_len > self.model.n_positions:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.n_positions="
                f"{self.model.n_positions}; lower data.seq_len"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Config":
        """Config with some sections replaced by dicts of field updates, e.g. train={"steps": 5}."""
        updates = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()}
        return dataclasses.replace(self, **updates)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
    "train": TrainConfig, "mesh": MeshConfig, "checkpoint": CheckpointConfig,
}


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or fail naming the key."""
    if typ is Any or value is None:
        return value
    origin = typing.get_origin(typ)
    if typ is list or origin is list:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(typ, types.UnionType):
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects true/false (got {value!r})")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} expects {typ.__name__} (got {value!r})") from None
    return value


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not section.key=value (e.g. train.steps=20)")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:  # YAML scalars: numbers, true/false, lists, quoted strings ("{title}\n{abstract}")
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # anything else is taken as the plain string it is
    return section, key, value


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Resolve a nested dict (as read from YAML) plus `section.key=value` overrides."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})[key] = value
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{_closest(section, list(SECTIONS))}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        types_ = _field_types(cls)
        for key in values:
            if key not in types_:
                options = [f"{name}.{k}" for k in types_]
                raise ConfigError(f"unknown config key '{name}.{key}'{_closest(f'{name}.{key}', options)}")
        preset_table = {"model": MODEL_PRESETS, "optim": OPTIM_PRESETS}.get(name)
        if preset_table is not None:
            preset = values.get("preset", cls.preset)
            _check_choice(f"{name}.preset", preset, tuple(preset_table))
            values = {**preset_table[preset], **values}
        sections[name] = cls(**{k: _coerce(f"{name}.{k}", v, types_[k]) for k, v in values.items()})
    return Config(**sections).validate()


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML config file (or only defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}; pass a YAML file such as configs/tiny.yaml")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    return build_config(raw, overrides)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(p)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. a run directory's config.yaml)."""
    return build_config(d)
