"""Named values a config refers to: GPT-2's tokenizer constants, model sizes and optimizer presets
(the learning-rate schedules are declared in schedules.py). Adding a model preset is one line here; a preset of another
family than GPT-2 names its `family` (flax_gpt/model/family.py builds each)."""

from __future__ import annotations

from typing import Any

# GPT-2's tokenizer, the one place these numbers are written down.
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256  # <|endoftext|>, also GPT-2's BOS and our document separator

# Model families (each built in flax_gpt/model/family.py) and architecture presets.
FAMILIES = ("gpt2", "llama")

# Architecture presets. `tiny` exists for tests: small enough to compile in seconds on a CPU but
# still with the real GPT-2 vocabulary so the real tokenizer and export paths are exercised.
_GPT2 = dict(vocab_size=GPT2_VOCAB_SIZE, n_positions=1024)
_LLAMA = dict(family="llama", layer_norm_epsilon=1e-5, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, **_GPT2),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, **_GPT2),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, **_GPT2),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, **_GPT2),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, **_GPT2),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=GPT2_VOCAB_SIZE, n_positions=256),
    # The Llama architecture (HF config.json of each model; no dropout). SmolLM2-135M: 134,515,008
    # parameters; TinyLlama-1.1B: 1,100,048,384. `tiny-llama` is `tiny`'s Llama twin for tests.
    "smollm2-135m": dict(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, n_inner=1536, vocab_size=49152,
                         n_positions=8192, rope_theta=100000.0, tie_word_embeddings=True, **_LLAMA),
    "tinyllama-1.1b": dict(n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, n_inner=5632, vocab_size=32000,
                           n_positions=2048, rope_theta=10000.0, tie_word_embeddings=False, **_LLAMA),
    "tiny-llama": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_inner=128, vocab_size=GPT2_VOCAB_SIZE,
                       n_positions=256, rope_theta=10000.0, tie_word_embeddings=False, **_LLAMA),
}

# `keras` reproduces transformers' TF `AdamWeightDecay` defaults (the usual Keras recipe):
# epsilon 1e-7, no clipping, no warmup.
OPTIM_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0),
    "keras": dict(b1=0.9, b2=0.999, eps=1e-7, clip_norm=0.0, warmup_steps=0),
}
