"""Typed, frozen configuration: the sections and their fields (reading them from YAML and
`section.key=value` overrides is `config_files.py`).

Every field declares itself once, with `setting(...)`: its default, what it means, whether changing
it changes what a run computes (`effect="result"`: a run directory refuses the change on resume)
or only how the run goes (`effect="run"`), its allowed values (`choices`, a numeric range `valid`,
a `check`), and its label in the model card. The resume check, the model card, `flax-gpt config
--explain` and `validate()` all read that declaration: a value is checked against its field's type
annotation and declaration in one place, `validate()`, which every way of building a config ends in.

This module never imports jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from flax_gpt.config_checks import text_template
from flax_gpt.errors import ConfigError
from flax_gpt.presets import FAMILIES, GPT2_VOCAB_SIZE, MODEL_PRESETS, OPTIM_PRESETS
from flax_gpt.schedules import SCHEDULES

RESULT, RUN = "result", "run"
# Seeds feed jax.random.key and numpy's generators as unsigned 32-bit words; the step counter is int32.
SEEDS, STEPS = "[0, 4294967295]", "[0, 2147483647]"
POSITIVE, NON_NEGATIVE, PROBABILITY = "[1, inf)", "[0, inf)", "[0, 1)"


def setting(default: Any, doc: str, *, effect: str = RESULT, choices: tuple | dict = (), card: str = "",
            legacy: dict | None = None, valid: str = "", check=None, architecture: bool = False) -> Any:
    """Declare a config field: default, meaning, effect (RESULT or RUN), allowed values, card label, and
    `legacy`: values older configs and run directories hold, read as their present equivalents.

    `choices`: the allowed values, or a registry (a dict) whose keys they are, read at each check, so
    the registry stays the one list of them.
    `valid`: the numbers the field takes, as intervals joined by "or": "[0, 1)", "(0, inf)", "-1 or [1, inf)".
    `check`: a function given a set (non-empty) value; it raises ValueError saying what is wrong.
    `architecture`: the field shapes or defines the parameters (a checkpoint made with another value
    does not fit this model)."""
    meta = {"doc": doc, "effect": effect, "choices": choices if isinstance(choices, dict) else tuple(choices),
            "card": card, "legacy": legacy or {}, "valid": valid, "bounds": _bounds(valid), "check": check,
            "architecture": architecture}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")


def _bounds(valid: str) -> tuple:
    """"-1 or [1, inf)" -> ((-1, True, -1, True), (1, True, inf, False)): (low, low in, high, high in) per part."""
    parts = [_INTERVAL.fullmatch(p.strip()) or float(p) for p in valid.split(" or ") if p.strip()]
    return tuple((float(m[2]), m[1] == "[", float(m[3]), m[4] == "]") if isinstance(m, re.Match) else (m, True, m, True)
                 for m in parts)


def _within(x: float, bounds: tuple) -> bool:
    return any((lo < x or (lo_in and x == lo)) and (x < hi or (hi_in and x == hi)) for lo, lo_in, hi, hi_in in bounds)


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _kind(typ: Any) -> str:
    if isinstance(typ, types.UnionType):
        return " or ".join(map(_kind, typing.get_args(typ)))
    if (typing.get_origin(typ) or typ) is list:
        return f"a list of {_kind((typing.get_args(typ) or (Any,))[0]).split(' ', 1)[-1]}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(typ, "a value")


def _as_type(value: Any, typ: Any) -> Any:
    """`value` (as YAML or a caller gave it) as `typ`; ValueError, TypeError or OverflowError when it is not one."""
    if isinstance(typ, types.UnionType):
        return _as_one_of(value, typing.get_args(typ))
    if (typing.get_origin(typ) or typ) is list:
        return _as_list(value, (typing.get_args(typ) or (Any,))[0])
    if typ is bool:
        return _as_bool(value)
    if typ is Any:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str, os.PathLike)):
        raise TypeError  # YAML reads yes/no/on/off as booleans: never a number or a text here
    if typ is str:
        return _as_text(value)
    return _as_number(value, typ)


def _as_one_of(value: Any, members: tuple) -> Any:
    """`value` as the first of a union's `members` it is."""
    for member in members:
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            return _as_type(value, member)
    raise ValueError


def _as_list(value: Any, item: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError
    return [_as_type(v, item) for v in value]


def _as_bool(value: Any) -> bool:
    """A boolean, or one of the words YAML or a command line spells one with; never a number."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _BOOL_WORDS:
        return _BOOL_WORDS[word]
    raise ValueError


def _as_text(value: float | str | os.PathLike) -> str:
    if isinstance(value, float):
        raise TypeError  # 1.10 would read as "1.1": a text that looks like a number must be quoted
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _as_number(value: float | str | os.PathLike, typ: Any) -> float:
    if typ is int and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    number = value if isinstance(value, int) else float(value)  # "1e4"; "nan" and "inf" are refused below
    if not math.isfinite(number) or (typ is int and not float(number).is_integer()):
        raise ValueError
    return int(number) if typ is int else float(number)


def check_setting(key: str, f: dataclasses.Field, typ: Any, value: Any) -> Any:
    """One value as its field declares it (a legacy value read as its present one, typed as the annotation
    says, one of `choices`, within `valid`, passing `check`), or ConfigError naming the key, value and fix."""
    meta = f.metadata
    value = next((new for old, new in meta["legacy"].items() if type(old) is type(value) and old == value), value)
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    example = f"{key}={str(default).lower() if isinstance(default, bool) else default or repr(default)}"
    if value is None:
        raise ConfigError(f"{key} has no value (YAML reads an empty value, ~ and null as none); give {_kind(typ)}, "
                          f"e.g. {example}, or leave {key} out for its default")
    try:
        typed = _as_type(value, typ)
    except (ValueError, TypeError, OverflowError):
        hint = "; YAML reads yes/no/on/off as true/false" if isinstance(value, bool) else ""
        fix = "quote the value to keep it as text" if typ is str and isinstance(value, (bool, float)) else \
            f"write e.g. {example}"
        raise ConfigError(f"{key}={value!r} is not {_kind(typ)}{hint}; {fix}") from None
    if meta["choices"] and typed not in meta["choices"]:
        raise ConfigError(f"{key}={typed!r} is not one of {', '.join(map(str, meta['choices']))}")
    if meta["bounds"] and not _within(typed, meta["bounds"]):
        raise ConfigError(f"{key}={typed!r} is out of range; {key} takes {meta['valid']} (default {default!r})")
    try:
        if meta["check"] and typed:
            meta["check"](typed)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key}={typed!r} {e}") from None
    return typed


def profile_range(text: str) -> tuple[int, int]:
    """`train.profile_steps` "START:END" -> (START, END), steps START+1 .. END traced."""
    try:
        start, end = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"train.profile_steps={text!r} is not START:END (e.g. 10:15)") from None
    if not 0 <= start < end:
        raise ConfigError(f"train.profile_steps={text!r} needs 0 <= START < END")
    return start, end


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Section:
    """What every config section shares: `validate()` checks each value against its field's declaration
    and returns the section with the values typed as declared; `check_rules` adds rules between fields."""

    def validate(self):
        name = next(n for n, cls in SECTIONS.items() if cls is type(self))
        typed = {f.name: check_setting(f"{name}.{f.name}", f, _hints(type(self))[f.name], getattr(self, f.name))
                 for f in dataclasses.fields(self)}
        checked = dataclasses.replace(self, **typed)
        checked.check_rules()
        return checked

    def check_rules(self) -> None:
        """Rules between this section's fields (a single field's rule is its declaration)."""


@dataclass(frozen=True)
class ModelConfig(Section):
    preset: str = setting("gpt2", "architecture preset; fills the family and sizes below unless they are set",
                          choices=tuple(MODEL_PRESETS))
    family: str = setting("gpt2", "model family: gpt2 or llama (the Llama architecture: SmolLM2, TinyLlama)",
                          choices=FAMILIES, card="family", architecture=True)
    n_layer: int = setting(12, "transformer blocks", card="layers", valid=POSITIVE, architecture=True)
    n_embd: int = setting(768, "model width D", card="width", valid=POSITIVE, architecture=True)
    n_head: int = setting(12, "attention heads (must divide n_embd)", card="heads", valid=POSITIVE,
                          architecture=True)
    vocab_size: int = setting(GPT2_VOCAB_SIZE, "vocabulary size (GPT-2: 50257)", card="vocab", valid=POSITIVE,
                              architecture=True)
    n_positions: int = setting(1024, "context length (position embeddings)", card="context (n_positions)",
                               valid=POSITIVE, architecture=True)
    n_inner: int = setting(0, "MLP width; 0 means 4 * n_embd, as GPT-2", valid=NON_NEGATIVE, architecture=True)
    layer_norm_epsilon: float = setting(1e-5, "LayerNorm epsilon (llama: RMSNorm's)", valid="(0, inf)")
    n_kv_head: int = setting(0, "llama: key/value heads (grouped-query attention); 0 = n_head", valid=NON_NEGATIVE,
                             architecture=True)
    head_dim: int = setting(0, "llama: dimension of a head; 0 = n_embd / n_head", valid=NON_NEGATIVE,
                            architecture=True)
    rope_theta: float = setting(10000.0, "llama: base of the rotary position frequencies", valid="(0, inf)",
                                architecture=True)
    tie_word_embeddings: bool = setting(True, "the LM head is the token embedding (gpt2: always)",
                                        card="tied embeddings", architecture=True)
    embd_pdrop: float = setting(0.1, "dropout on the embeddings", card="dropout: embeddings", valid=PROBABILITY)
    attn_pdrop: float = setting(0.1, "dropout on attention probabilities", card="dropout: attention",
                                valid=PROBABILITY)
    resid_pdrop: float = setting(0.1, "dropout on each block's residual branch", card="dropout: residual",
                                 valid=PROBABILITY)
    dtype: str = setting("float32", "compute dtype; parameters, optimizer state, softmax and loss stay float32",
                         effect=RUN, choices=("float32", "bfloat16"), card="compute dtype")
    remat: str = setting("none", "what the backward pass recomputes (less memory, more FLOPs; README)", effect=RUN,
                         choices=("none", "minimal", "save_attention", "full"), legacy={True: "full", False: "none"})
    attention: str = setting("auto", "attention kernel: auto (splash on TPU, cudnn on NVIDIA GPUs when they apply, "
                             "else xla), xla, cudnn or splash", effect=RUN, choices=("auto", "xla", "cudnn", "splash"))
    pad_vocab_to: int = setting(0, "pad the embedding's vocab rows to a multiple of this (0 = off); never exported",
                                valid=NON_NEGATIVE, architecture=True)
    init_from: str = setting("", "start from: Hub id, HF folder or run directory; empty = GPT-2's own init",
                             effect=RUN, card="initialised from")

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_to
        return self.vocab_size if m <= 0 else -(-self.vocab_size // m) * m

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def architecture(self) -> dict:
        """The fields declared `architecture=True`: what a checkpoint of this model must match."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("architecture")}

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def check_rules(self) -> None:
        if self.n_embd % self.n_head and not self.head_dim:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                              "choose a head count that divides the width")
        if self.family == "gpt2" and (self.n_kv_head or self.head_dim or not self.tie_word_embeddings):
            raise ConfigError("model.n_kv_head, model.head_dim and model.tie_word_embeddings=false apply to "
                              "model.family=llama only (gpt2 has a key/value head per head and a tied head)")
        if self.family == "gpt2":
            return
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={self.kv_heads}; "
                              "each key/value head must serve the same number of query heads")
        if self.head_size % 2:
            raise ConfigError(f"rotary positions need an even head dimension (got {self.head_size}); "
                              "change model.head_dim or model.n_head")
        drop = [k for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop") if getattr(self, k)]
        if drop:
            raise ConfigError(f"model.family=llama has no dropout; set {'=0 '.join(f'model.{k}' for k in drop)}=0 "
                              "(a llama preset such as model.preset=smollm2-135m does)")


@dataclass(frozen=True)
class DataConfig(Section):
    source: str | list[str] = setting(  # noqa: RUF009 - setting() returns a dataclasses.field
        "synthetic", "synthetic, a Hub dataset id, or local/gs:// files: a path, glob, folder or list (csv, json, "
        "jsonl, parquet, txt)", card="data source")
    hf_split: str = setting("train", "split of a Hub dataset or dataset folder")
    hf_revision: str = setting("", "Hub dataset revision (pin it: an unpinned Hub source is identified by name)")
    hf_name: str = setting("", "Hub dataset configuration name, if it has several")
    streaming: bool = setting(False, "stream a Hub dataset instead of downloading it first", effect=RUN)
    text_column: str = setting("abstract", "column holding the text (unless data.template is set)")
    template: str = setting("", 'text built from columns, e.g. "{title}\\n{abstract}"; overrides text_column',
                            card="text template", check=text_template)
    normalize_whitespace: bool = setting(True, "collapse runs of whitespace in each field to one space")
    tokenizer: str = setting("gpt2", "gpt2 (offline GPT-2 BPE) or a transformers tokenizer folder/id",
                             card="tokenizer")
    seq_len: int = setting(256, "tokens per row (a row predicts seq_len - 1 targets, so at least 2)",
                           card="sequence length", valid="[2, inf)")
    val_fraction: float = setting(0.05, "fraction of documents held out for validation (0 = none)",
                                  card="validation fraction", valid=PROBABILITY)
    split_seed: int = setting(0, "seed of the document-level train/validation split", valid=SEEDS)
    shards_dir: str = setting("data/shards", "where prepared shards + manifest.json live", effect=RUN)
    rows_per_shard: int = setting(8192, "rows per shard file", effect=RUN, valid=POSITIVE)
    packing: str = setting("pack", "pack: documents concatenated with EOS; pad: one document a row, "
                           "padded/truncated", choices=("pack", "pad"), card="packing")
    document_mask: bool = setting(False, "documents in a row do not attend to each other; positions restart",
                                  card="document masking")
    synthetic_docs: int = setting(4000, "documents of the synthetic corpus", valid=POSITIVE)
    prefetch: int = setting(2, "batches prepared ahead on a background thread (0 = none)", effect=RUN,
                            valid=NON_NEGATIVE)
    read_batch_docs: int = setting(2048, "documents read and tokenized per batch by prepare (bounds its memory)",
                                   effect=RUN, valid=POSITIVE)


@dataclass(frozen=True)
class OptimConfig(Section):
    preset: str = setting("default", "default (clip 1.0, eps 1e-8) or keras (the usual recipe's AdamWeightDecay)",
                          choices=tuple(OPTIM_PRESETS))
    schedule: str = setting("exponential", "learning-rate schedule after warmup", choices=SCHEDULES,
                            card="schedule")
    learning_rate: float = setting(5e-4, "peak learning rate", card="learning rate", valid="(0, inf)")
    warmup_steps: int = setting(0, "linear warmup from 0 over this many steps", card="warmup steps", valid=STEPS)
    decay_steps: int = setting(1000, "exponential: lr * decay_rate ** (step / decay_steps), Keras' ExponentialDecay",
                               valid=POSITIVE)
    decay_rate: float = setting(1.0, "exponential: factor per decay_steps (1.0 = constant)", card="decay rate",
                                valid="(0, inf)")
    staircase: bool = setting(False, "exponential: decay in whole steps of decay_steps")
    min_lr_ratio: float = setting(0.0, "cosine/linear/wsd: final learning rate as a fraction of the peak",
                                  valid="[0, 1]")
    decay_fraction: float = setting(0.2, "wsd: fraction of the run spent decaying at the end", valid="(0, 1]")
    b1: float = setting(0.9, "AdamW beta1", card="AdamW b1", valid=PROBABILITY)
    b2: float = setting(0.999, "AdamW beta2", card="AdamW b2", valid=PROBABILITY)
    eps: float = setting(1e-8, "AdamW epsilon", card="AdamW eps", valid="(0, inf)")
    mu_dtype: str = setting("float32", "AdamW first moment's dtype: bfloat16 halves its memory and traffic "
                            "(the second moment stays float32)", choices=("float32", "bfloat16"),
                            card="AdamW first moment")
    weight_decay: float = setting(0.01, "decoupled weight decay on weight matrices", card="weight decay",
                                  valid=NON_NEGATIVE)
    decay_embeddings: bool = setting(True, "also decay the embedding tables (biases and norms never are)")
    clip_norm: float = setting(1.0, "global-norm gradient clipping; 0 disables it", card="gradient clipping",
                               valid=NON_NEGATIVE)


@dataclass(frozen=True)
class TrainConfig(Section):
    run_dir: str = setting("runs/default", "run directory: config, checkpoints, metrics (local or gs://)",
                           effect=RUN)
    steps: int = setting(100, "optimizer steps to train to; 0 = derive from train.epochs", effect=RUN,
                         card="steps", valid=STEPS)
    epochs: float = setting(1.0, "passes over the training split, used only when train.steps is 0", effect=RUN,
                            valid=NON_NEGATIVE)
    batch_size: int = setting(8, "global batch, in sequences", card="batch size (sequences)", valid=POSITIVE)
    grad_accum: int = setting(1, "micro-batches per step (same result, less memory)", effect=RUN,
                              card="gradient accumulation", valid=POSITIVE)
    seed: int = setting(0, "seed of the init, data order and dropout", card="seed", valid=SEEDS)
    eval_every: int = setting(0, "evaluate every N steps; 0 = only at the end", effect=RUN, valid=NON_NEGATIVE)
    eval_batch_size: int = setting(0, "evaluation batch; 0 = train.batch_size", effect=RUN, valid=NON_NEGATIVE)
    log_every: int = setting(1, "write training metrics every N steps", effect=RUN, valid=POSITIVE)
    progress: bool = setting(True, "show a progress bar", effect=RUN)
    export_dir: str = setting("", "export an HF folder here at the end of training (empty = no export)",
                              effect=RUN)
    sample_prompts: list[str] = setting([], "prompts sampled and printed at the end of training",  # noqa: RUF009
                                        effect=RUN)
    sample_max_new_tokens: int = setting(48, "tokens generated per end-of-training sample", effect=RUN,
                                         valid=POSITIVE)
    profile_steps: str = setting("", "START:END writes a jax.profiler trace of those steps to RUN_DIR/profile",
                                 effect=RUN, check=profile_range)
    wandb_project: str = setting("", "also log each metrics record to this W&B project; empty = off", effect=RUN)
    wandb_entity: str = setting("", "W&B team or user of wandb_project; empty = your default entity", effect=RUN)
    wandb_run_name: str = setting("", "W&B run name; empty = the run directory's name", effect=RUN)

    def check_rules(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
                              f"{self.grad_accum}; pick a batch that splits into micro-batches")
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("train.steps=0 and train.epochs=0 ask for no training; set train.steps=N "
                              "or train.epochs=E")


@dataclass(frozen=True)
class MeshConfig(Section):
    data: int = setting(-1, "data-parallel axis; -1 fills the devices the other axes leave", effect=RUN,
                        valid="-1 or [1, inf)")
    fsdp: int = setting(1, "fully sharded data-parallel axis (parameters and optimizer state sharded)", effect=RUN,
                        valid="-1 or [1, inf)")
    tensor: int = setting(1, "tensor-parallel axis (Megatron-style splits of the matmuls)", effect=RUN,
                          valid="-1 or [1, inf)")

    def check_rules(self) -> None:
        if sum(s == -1 for s in (self.data, self.fsdp, self.tensor)) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


@dataclass(frozen=True)
class CheckpointConfig(Section):
    every: int = setting(0, "checkpoint every N steps; 0 = only at the end and on preemption", effect=RUN,
                         valid=NON_NEGATIVE)
    keep: int = setting(3, "newest checkpoints kept", effect=RUN, valid=POSITIVE)
    keep_best: bool = setting(True, "also keep the checkpoint with the best validation loss", effect=RUN)
    async_save: bool = setting(True, "save in the background while training goes on", effect=RUN)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
    "train": TrainConfig, "mesh": MeshConfig, "checkpoint": CheckpointConfig,
}
PRESETS = {"model": MODEL_PRESETS, "optim": OPTIM_PRESETS}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> Config:
        """This config with every value checked against its declaration and typed as declared, then the
        rules between sections; ConfigError names the first problem. Every way of building one ends here."""
        checked = dataclasses.replace(self, **{s: getattr(self, s).validate() for s in SECTIONS})
        if checked.data.seq_len > checked.model.n_positions:
            raise ConfigError(f"data.seq_len={checked.data.seq_len} exceeds model.n_positions="
                              f"{checked.model.n_positions}; lower data.seq_len")
        return checked

    def items(self):
        """(`section.key`, section name, dataclass field, value) for every setting, in order."""
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                yield f"{section}.{f.name}", section, f, getattr(obj, f.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        """Config with some sections replaced by dicts of field updates, e.g. train={"steps": 5}."""
        updates = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()}
        return dataclasses.replace(self, **updates)
