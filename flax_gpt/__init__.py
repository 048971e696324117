"""flax_gpt: a high-throughput JAX/Flax trainer for GPT-2-family causal language models."""

__version__ = "0.1.0"
