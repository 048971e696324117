"""FLOPs per token, parameter counts and model-FLOPs utilisation (MFU).

Conventions (Kaplan et al. 2020 section 2.1, PaLM appendix B, nanoGPT `estimate_mfu`):

- Training costs 6 FLOPs per token per weight that takes part in a matmul: 2 in the forward pass
  (one multiply-add), 4 in the backward pass (gradients w.r.t. activations and w.r.t. weights).
- Attention adds 12 * n_layer * T * D per token (T = sequence length, D = n_embd): per layer the
  forward pass spends 2*T*D on Q K^T and 2*T*D on A V; times 3 for forward + backward.
  **No causal halving**: PaLM and nanoGPT count the full T x T score matrix, and our XLA attention
  computes the full masked matrix anyway, so this is also what the hardware executes. MFU figures
  are therefore comparable with the ones those papers and repositories publish.
- These are *model* FLOPs: rematerialisation (`model.remat`) recomputes the forward pass without
  counting, and vocabulary padding (`model.pad_vocab_to`) adds logits nobody asked for, so neither
  changes `flops_per_token`. MFU is useful work over peak, not hardware utilisation.

This module never imports jax: it is plain arithmetic on a `ModelConfig` and a device-kind string.
"""

from __future__ import annotations

import re

from flax_gpt.config import ModelConfig


def block_param_count(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: weights, biases and LayerNorm scales/offsets."""
    D, F = cfg.n_embd, cfg.d_ff
    attn = (D * 3 * D + 3 * D) + (D * D + D)  # c_attn (fused QKV) + c_proj
    mlp = (D * F + F) + (F * D + D)  # c_fc + c_proj
    norms = 2 * (2 * D)  # ln_1, ln_2: scale and bias
    return attn + mlp + norms


def flops_param_count(cfg: ModelConfig) -> int:
    """N in the 6*N term: the parameters whose use costs FLOPs per token.

    N = all transformer-block parameters (weights, biases, LayerNorms, as Kaplan's non-embedding
    count) + the final LayerNorm + V*D for the LM-head matmul. The LM head is the tied `wte`, so
    it is counted once, as a matmul (the embedding lookup itself costs no FLOPs). The position
    embedding `wpe` is a lookup and is excluded. V is the real vocabulary, not the padded one.
    """
    return cfg.n_layer * block_param_count(cfg) + 2 * cfg.n_embd + cfg.vocab_size * cfg.n_embd


def param_count(cfg: ModelConfig) -> int:
    """Total parameters of the model as flax_gpt builds it (tied head counted once).

    wte (padded_vocab x D) + wpe (n_positions x D) + blocks + ln_f. Without `pad_vocab_to` this
    equals `transformers.GPT2LMHeadModel(...).num_parameters()` (124,439,808 for `gpt2`).
    """
    D = cfg.n_embd
    embeddings = cfg.padded_vocab * D + cfg.n_positions * D
    return embeddings + cfg.n_layer * block_param_count(cfg) + 2 * D


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at sequence length `seq_len`.

    6 * N + 12 * n_layer * seq_len * n_embd, with N = `flops_param_count(cfg)` (blocks + ln_f +
    the tied LM-head matmul, `wpe` excluded) and the attention term without causal halving
    (PaLM appendix B, nanoGPT `estimate_mfu`). Multiply by tokens/s to get achieved FLOP/s.
    """
    return float(6 * flops_param_count(cfg) + 12 * cfg.n_layer * seq_len * cfg.n_embd)


# Dense (no 2:4 sparsity) bf16 peak FLOP/s of ONE jax device, keyed by a lower-case substring of
# `jax.Device.device_kind`, matched on whole words ("l4" does not match "L40S", "h200" does not
# match "GH200"). The longest matching key wins, so "tpu v5 lite" beats "tpu v5" and "h100 pcie"
# beats "h100". TPU v2/v3 expose each of a chip's two TensorCores as its own jax
# device, so their per-chip figures are halved; v4 and v5p run the two cores as one "megacore"
# device; v5e and v6e chips have one TensorCore. None means "no meaningful peak" (MFU undefined).
PEAK_FLOPS: dict[str, float | None] = {
    # Google Cloud TPU system architecture pages, https://cloud.google.com/tpu/docs/<version>
    "tpu v2": 45e12 / 2,  # v2: 45 TFLOP/s bf16 per chip, 2 TensorCores = 2 jax devices
    "tpu v3": 123e12 / 2,  # v3: 123 TFLOP/s bf16 per chip, 2 TensorCores = 2 jax devices
    "tpu v4": 275e12,  # v4: 275 TFLOP/s bf16 per chip (megacore: 1 chip = 1 device)
    "tpu v4 lite": 138e12,  # v4i inference chip: 138 TFLOP/s bf16 (Jouppi et al., ISCA 2021)
    "tpu v5 lite": 197e12,  # v5e (device_kind "TPU v5 lite"): 197 TFLOP/s bf16 per chip
    "tpu v5e": 197e12,  # alias some runtimes report
    "tpu v5": 459e12,  # v5p (device_kind "TPU v5"): 459 TFLOP/s bf16 per chip
    "tpu v5p": 459e12,  # alias
    "tpu v6 lite": 918e12,  # v6e Trillium (device_kind "TPU v6 lite"): 918 TFLOP/s bf16 per chip
    "tpu v6e": 918e12,  # alias
    # NVIDIA data sheets (dense figures; the headline numbers with sparsity are twice these).
    # https://www.nvidia.com/en-us/data-center/h100/ : SXM 989.5, PCIe 756, NVL 835 TFLOP/s bf16.
    "h100": 989e12,  # "NVIDIA H100 80GB HBM3" is the SXM part
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    # https://www.nvidia.com/en-us/data-center/h200/ : SXM 989 (same tensor cores as H100 SXM),
    # NVL 835 TFLOP/s bf16.
    "h200": 989e12,
    "h200 nvl": 835e12,
    # https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/ : Hopper GPU, 989 dense.
    "gh200": 989e12,
    # https://www.nvidia.com/en-us/data-center/a100/ : 312 TFLOP/s bf16, SXM and PCIe alike.
    "a100": 312e12,
    # https://www.nvidia.com/en-us/data-center/l4/ : 242 TFLOP/s bf16 with sparsity -> 121 dense.
    "l4": 121e12,
    # A10G is AWS's variant of the A10 (125 TFLOP/s dense bf16 on the A10 data sheet) with lower
    # tensor throughput; 70 TFLOP/s as measured/quoted by Baseten
    # (https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/) and used by levanter.
    "a10g": 70e12,
    # https://www.nvidia.com/en-us/data-center/v100/ : Volta has no bf16; these are the fp16
    # tensor-core peaks (SXM2 125, PCIe 112 TFLOP/s), the precision one trains in on a V100.
    "v100": 125e12,
    "v100-pcie": 112e12,
    # A CPU has no single meaningful peak (depends on cores, AVX-512/AMX, clocks): MFU undefined.
    "cpu": None,
}


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this `device_kind`; None for CPU or unknown kinds."""
    kind = device_kind.lower()
    matches = [key for key in PEAK_FLOPS if _contains_word(kind, key)]
    if not matches:
        return None
    return PEAK_FLOPS[max(matches, key=len)]


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, device_kind: str) -> float | None:
    """Model-FLOPs utilisation in [0, 1]: achieved model FLOP/s over the device's dense bf16 peak.

    None when the device has no peak in `PEAK_FLOPS` (CPU, unknown accelerators).
    """
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return tokens_per_sec_per_device * flops_per_token / peak


def _contains_word(text: str, key: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", text) is not None
