"""Typed, frozen configuration: the sections and their fields (reading them from YAML and
`section.key=value` overrides is `config_files.py`).

Every field declares itself once, with `setting(...)`: its default, what it means, whether changing
it changes what a run computes (`effect="result"`: a run directory refuses the change on resume)
or only how the run goes (`effect="run"`), its allowed values, and its label in the model card.
The resume check, the model card and `flax-gpt config --explain` all read that declaration.

This module never imports jax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


from flax_gpt.errors import ConfigError
from flax_gpt.presets import GPT2_VOCAB_SIZE, MODEL_PRESETS, OPTIM_PRESETS, SCHEDULES

RESULT, RUN = "result", "run"


def setting(default: Any, doc: str, *, effect: str = RESULT, choices: tuple = (), card: str = "",
            legacy: dict | None = None) -> Any:
    """Declare a config field: default, meaning, effect (RESULT or RUN), allowed values, card label, and
    `legacy`: values older configs and run directories hold, read as their present equivalents."""
    meta = {"doc": doc, "effect": effect, "choices": tuple(choices), "card": card, "legacy": legacy or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    preset: str = setting("gpt2", "architecture preset; fills the sizes below unless they are set",
                          choices=tuple(MODEL_PRESETS))
    n_layer: int = setting(12, "transformer blocks", card="layers")
    n_embd: int = setting(768, "model width D", card="width")
    n_head: int = setting(12, "attention heads (must divide n_embd)", card="heads")
    vocab_size: int = setting(GPT2_VOCAB_SIZE, "vocabulary size (GPT-2: 50257)", card="vocab")
    n_positions: int = setting(1024, "context length (position embeddings)", card="context (n_positions)")
    n_inner: int = setting(0, "MLP width; 0 means 4 * n_embd, as GPT-2")
    layer_norm_epsilon: float = setting(1e-5, "LayerNorm epsilon")
    embd_pdrop: float = setting(0.1, "dropout on the embeddings", card="dropout: embeddings")
    attn_pdrop: float = setting(0.1, "dropout on attention probabilities", card="dropout: attention")
    resid_pdrop: float = setting(0.1, "dropout on each block's residual branch", card="dropout: residual")
    dtype: str = setting("float32", "compute dtype; parameters, optimizer state, softmax and loss stay float32",
                         effect=RUN, choices=("float32", "bfloat16"), card="compute dtype")
    remat: str = setting("none", "what the backward pass recomputes (less memory, more FLOPs; README)", effect=RUN,
                         choices=("none", "minimal", "full"), legacy={True: "full", False: "none"})
    attention: str = setting("auto", "attention kernel: auto (splash on TPU, cudnn on NVIDIA GPUs when they apply, "
                             "else xla), xla, cudnn or splash", effect=RUN, choices=("auto", "xla", "cudnn", "splash"))
    pad_vocab_to: int = setting(0, "pad the embedding's vocab rows to a multiple of this (0 = off); never exported")
    init_from: str = setting("", "start from: Hub id, HF folder or run directory; empty = GPT-2's own init",
                             effect=RUN, card="initialised from")

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_to
        return self.vocab_size if m <= 0 else -(-self.vocab_size // m) * m

    def validate(self) -> None:
        for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive (got {getattr(self, k)})")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                              "choose a head count that divides the width")


@dataclass(frozen=True)
class DataConfig:
    source: Any = setting("synthetic", "synthetic, a Hub dataset id, or local/gs:// files: a path, glob, "
                          "folder or list (csv, json, jsonl, parquet, txt)", card="data source")
    hf_split: str = setting("train", "split of a Hub dataset or dataset folder")
    hf_revision: str = setting("", "Hub dataset revision (pin it: an unpinned Hub source is identified by name)")
    hf_name: str = setting("", "Hub dataset configuration name, if it has several")
    streaming: bool = setting(False, "stream a Hub dataset instead of downloading it first", effect=RUN)
    text_column: str = setting("abstract", "column holding the text (unless data.template is set)")
    template: str = setting("", 'text built from columns, e.g. "{title}\\n{abstract}"; overrides text_column',
                            card="text template")
    normalize_whitespace: bool = setting(True, "collapse runs of whitespace in each field to one space")
    tokenizer: str = setting("gpt2", "gpt2 (offline GPT-2 BPE) or a transformers tokenizer folder/id",
                             card="tokenizer")
    seq_len: int = setting(256, "tokens per row", card="sequence length")
    val_fraction: float = setting(0.05, "fraction of documents held out for validation (0 = none)",
                                  card="validation fraction")
    split_seed: int = setting(0, "seed of the document-level train/validation split")
    shards_dir: str = setting("data/shards", "where prepared shards + manifest.json live", effect=RUN)
    rows_per_shard: int = setting(8192, "rows per shard file", effect=RUN)
    packing: str = setting("pack", "pack: documents concatenated with EOS; pad: one document a row, "
                           "padded/truncated", choices=("pack", "pad"), card="packing")
    document_mask: bool = setting(False, "documents in a row do not attend to each other; positions restart",
                                  card="document masking")
    synthetic_docs: int = setting(4000, "documents of the synthetic corpus")
    prefetch: int = setting(2, "batches prepared ahead on a background thread", effect=RUN)
    read_batch_docs: int = setting(2048, "documents read and tokenized per batch by prepare (bounds its memory)",
                                   effect=RUN)

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2 (got {self.seq_len})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.rows_per_shard <= 0 or self.read_batch_docs <= 0:
            raise ConfigError(f"data.rows_per_shard and data.read_batch_docs must be positive "
                              f"(got {self.rows_per_shard}, {self.read_batch_docs})")


@dataclass(frozen=True)
class OptimConfig:
    preset: str = setting("default", "default (clip 1.0, eps 1e-8) or keras (the usual recipe's AdamWeightDecay)",
                          choices=tuple(OPTIM_PRESETS))
    schedule: str = setting("exponential", "learning-rate schedule after warmup", choices=SCHEDULES,
                            card="schedule")
    learning_rate: float = setting(5e-4, "peak learning rate", card="learning rate")
    warmup_steps: int = setting(0, "linear warmup from 0 over this many steps", card="warmup steps")
    decay_steps: int = setting(1000, "exponential: lr * decay_rate ** (step / decay_steps), Keras' ExponentialDecay")
    decay_rate: float = setting(1.0, "exponential: factor per decay_steps (1.0 = constant)", card="decay rate")
    staircase: bool = setting(False, "exponential: decay in whole steps of decay_steps")
    min_lr_ratio: float = setting(0.0, "cosine/linear/wsd: final learning rate as a fraction of the peak")
    decay_fraction: float = setting(0.2, "wsd: fraction of the run spent decaying at the end")
    b1: float = setting(0.9, "AdamW beta1", card="AdamW b1")
    b2: float = setting(0.999, "AdamW beta2", card="AdamW b2")
    eps: float = setting(1e-8, "AdamW epsilon", card="AdamW eps")
    weight_decay: float = setting(0.01, "decoupled weight decay on weight matrices", card="weight decay")
    decay_embeddings: bool = setting(True, "also decay wte/wpe (biases and LayerNorms never are)")
    clip_norm: float = setting(1.0, "global-norm gradient clipping; 0 disables it", card="gradient clipping")

    def validate(self) -> None:
        if self.decay_steps <= 0:
            raise ConfigError(f"optim.decay_steps must be positive (got {self.decay_steps})")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be positive (got {self.learning_rate})")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError("optim.min_lr_ratio must be in [0, 1] and optim.decay_fraction in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = setting("runs/default", "run directory: config, checkpoints, metrics (local or gs://)",
                           effect=RUN)
    steps: int = setting(100, "optimizer steps to train to; 0 = derive from train.epochs", effect=RUN,
                         card="steps")
    epochs: float = setting(1.0, "passes over the training split, used only when train.steps is 0", effect=RUN)
    batch_size: int = setting(8, "global batch, in sequences", card="batch size (sequences)")
    grad_accum: int = setting(1, "micro-batches per step (same result, less memory)", effect=RUN,
                              card="gradient accumulation")
    seed: int = setting(0, "seed of the init, data order and dropout", card="seed")
    eval_every: int = setting(0, "evaluate every N steps; 0 = only at the end", effect=RUN)
    eval_batch_size: int = setting(0, "evaluation batch; 0 = train.batch_size", effect=RUN)
    log_every: int = setting(1, "write training metrics every N steps", effect=RUN)
    progress: bool = setting(True, "show a progress bar", effect=RUN)
    export_dir: str = setting("", "export an HF folder here at the end of training (empty = no export)",
                              effect=RUN)
    sample_prompts: list = setting([], "prompts sampled and printed at the end of training", effect=RUN)
    sample_max_new_tokens: int = setting(48, "tokens generated per end-of-training sample", effect=RUN)
    profile_steps: str = setting("", "START:END writes a jax.profiler trace of those steps to RUN_DIR/profile",
                                 effect=RUN)
    wandb_project: str = setting("", "also log each metrics record to this W&B project; empty = off", effect=RUN)
    wandb_entity: str = setting("", "W&B team or user of wandb_project; empty = your default entity", effect=RUN)
    wandb_run_name: str = setting("", "W&B run name; empty = the run directory's name", effect=RUN)

    def validate(self) -> None:
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("train.batch_size and train.grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
                              f"{self.grad_accum}; pick a batch that splits into micro-batches")
        if self.steps < 0 or self.epochs < 0:
            raise ConfigError(f"train.steps and train.epochs must be >= 0 (got {self.steps}, {self.epochs})")
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("train.steps=0 and train.epochs=0 ask for no training; set train.steps=N "
                              "or train.epochs=E")
        if self.profile_steps:
            profile_range(self.profile_steps)


@dataclass(frozen=True)
class MeshConfig:
    data: int = setting(-1, "data-parallel axis; -1 fills the devices the other axes leave", effect=RUN)
    fsdp: int = setting(1, "fully sharded data-parallel axis (parameters and optimizer state sharded)", effect=RUN)
    tensor: int = setting(1, "tensor-parallel axis (Megatron-style splits of the matmuls)", effect=RUN)

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh axis sizes must be positive or -1 (got {sizes})")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = setting(0, "checkpoint every N steps; 0 = only at the end and on preemption", effect=RUN)
    keep: int = setting(3, "newest checkpoints kept", effect=RUN)
    keep_best: bool = setting(True, "also keep the checkpoint with the best validation loss", effect=RUN)
    async_save: bool = setting(True, "save in the background while training goes on", effect=RUN)

    def validate(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1 "
                              f"(got {self.every}, {self.keep})")


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

    def validate(self) -> "Config":
        for name, _, f, value in self.items():
            choices = f.metadata["choices"]
            if choices and value not in choices:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.data.seq_len > self.model.n_positions:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.n_positions="
                              f"{self.model.n_positions}; lower data.seq_len")
        return self

    def items(self):
        """(`section.key`, section name, dataclass field, value) for every setting, in order."""
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                yield f"{section}.{f.name}", section, f, getattr(obj, f.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Config":
        """Config with some sections replaced by dicts of field updates, e.g. train={"steps": 5}."""
        updates = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()}
        return dataclasses.replace(self, **updates)


def profile_range(text: str) -> tuple[int, int]:
    """`train.profile_steps` "START:END" -> (START, END), steps START+1 .. END traced."""
    try:
        start, end = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"train.profile_steps={text!r} is not START:END (e.g. 10:15)") from None
    if not 0 <= start < end:
        raise ConfigError(f"train.profile_steps={text!r} needs 0 <= START < END")
    return start, end
