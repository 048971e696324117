"""flax_gpt: a high-throughput JAX/Flax trainer for causal language models: GPT-2 and the Llama architecture."""

__version__ = "0.1.0"
