"""Causal self-attention for training and evaluation: one function, a kernel per platform.

`attend(q, k, v, segment_ids=..., kernel=...)` takes and returns (B,T,H,K). `model.attention`
names the kernel:

- `xla`: `jax.nn.dot_product_attention` with a boolean (B|1,1,T,T) mask. Runs anywhere; XLA
  writes the (B,H,T,T) scores and probabilities to memory and the backward pass reads them again.
- `splash`: Pallas splash attention on TPU, a flash-style kernel that never writes the T x T
  scores, skips the blocks above the diagonal and applies the document mask from segment ids
  inside the kernel.
- `cudnn`: cuDNN's fused flash attention on NVIDIA GPUs (bf16 only, head dim a multiple of 8).
- `auto`: splash on TPU, cuDNN on an NVIDIA GPU when dtype and head dim allow, XLA otherwise;
  on CPU it is exactly the `xla` path.

The platform is that of the devices the computation is traced for: the context mesh's (set by
`sharding.on_mesh`, also when `flax-gpt compile` plans for compile-only TPU devices on a CPU
host), else the default device's. Decode with a KV cache and training with attention dropout
stay in `gpt2.Attention` (neither kernel has dropout on the probabilities).

Dimension letters: B batch, T sequence, H heads, K head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from flax_gpt.errors import ConfigError
from flax_gpt.sharding import RULES, per_device

KERNELS = ("auto", "xla", "cudnn", "splash")

# Splash tiles are (block, K) slices of q/k/v and (block, block) score tiles: a block must be a
# multiple of the TPU's 128 lanes (key blocks always, query blocks once segment ids are used)
# and divide T. 512 is MaxText's default: few grid steps at T=1024, and a 512 x 512 float32
# score tile (1 MiB) leaves VMEM room for the backward kernels' several tiles.
LANES = 128
BLOCKS = (512, 256, 128)

# Name of the splash forward's saved outputs (out, logsumexp): a remat policy that saves this
# name (jax.checkpoint_policies.save_only_these_names) keeps them instead of rerunning the kernel.
SPLASH_RESIDUALS = "splash_attention"


def causal_mask(T: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """Boolean (B|1,1,T,T): query i sees key j <= i of the same segment (packed documents never
    attend to each other)."""
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def traced_device() -> tuple[str, str]:
    """(platform, device_kind) of the devices being traced for: the context mesh's, else the default device's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is None:
        device = jax.devices()[0]
    return device.platform, device.device_kind


def _cudnn_problem(platform: str, device_kind: str, dtype, K: int) -> str | None:
    """Why cuDNN's flash attention cannot take this call (None: it can)."""
    if platform != "gpu" or device_kind.upper().startswith("AMD"):
        return f"needs an NVIDIA GPU (the devices here: {device_kind})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"needs model.dtype=bfloat16 (got {jnp.dtype(dtype).name})"
    if K % 8 or K > 128:  # cuDNN flash: a multiple of 8, <= 128 (256 from Hopper on; 128 is safe everywhere)
        return f"needs a head dim that is a multiple of 8 and at most 128 (got n_embd/n_head = {K})"
    return None


def choose_kernel(kernel: str, *, platform: str, device_kind: str, dtype, K: int, T: int,
                  interpret: bool = False) -> str:
    """The kernel `attend` runs: `auto` resolved for the platform, an explicit one checked against it
    (`interpret`: splash runs in Pallas' interpreter, on any platform)."""
    if kernel not in KERNELS:
        raise ConfigError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "auto":
        if platform == "tpu" and T % LANES == 0:
            return "splash"
        if platform == "gpu" and _cudnn_problem(platform, device_kind, dtype, K) is None:
            return "cudnn"
        return "xla"
    if kernel == "cudnn" and (problem := _cudnn_problem(platform, device_kind, dtype, K)):
        raise ConfigError(f"model.attention=cudnn {problem}; use model.attention=auto or xla")
    if kernel == "splash" and platform != "tpu" and not interpret:
        raise ConfigError(f"model.attention=splash needs a TPU (the devices here: {device_kind}); "
                          "use model.attention=auto or xla")
    return kernel


def splash_block_sizes(T: int) -> splash.BlockSizes:
    """Splash tiles for sequence length T: the largest of BLOCKS that divides T, forward and backward."""
    if T % LANES:
        raise ConfigError(f"model.attention=splash needs data.seq_len to be a multiple of {LANES} (got {T}); "
                          f"use data.seq_len={max(LANES, T // LANES * LANES)} or model.attention=auto")
    b = next(b for b in BLOCKS if T % b == 0)
    # Separate dq and dkv backward kernels (MaxText's default): the fused one adds its per-block
    # partial dq in the compute dtype (bf16 partial sums), for two fewer matmuls per tile.
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _splash(q, k, v, segment_ids, *, interpret: bool) -> jax.Array:
    """(B,H,T,K) splash attention, q already scaled; segment ids (B,T) or None."""
    B, H, T, _ = q.shape
    # GPT-2's K=64 fills half of the kernel's 128-lane tiles: q/k/v blocks are (block, 64), so
    # q @ k^T contracts over half the MXU's depth and p @ v fills half its width. Attention is
    # ~10% of a GPT-2 step's FLOPs at T=1024 (2TD causal vs 24D^2 per token and layer), and
    # padding K to 128 would double that work to fill the lanes, so the kernel takes K as it is.

    def local(q, k, v, seg):
        # Built where it runs: under shard_map the heads are the device's own (H / tensor).
        mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * q.shape[1])
        kernel = splash.make_splash_mha(mask, block_sizes=splash_block_sizes(T), head_shards=1, q_seq_shards=1,
                                        residual_checkpoint_name=SPLASH_RESIDUALS, interpret=interpret)
        if seg is None:
            return jax.vmap(kernel)(q, k, v)  # the kernel is per example (H,T,K); vmap adds B to its grid
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=seg, kv=seg))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    # XLA cannot split a Mosaic kernel over devices (it would gather whole operands onto each),
    # so each device runs it on its own batch rows and heads, split as the rules table splits them.
    batch, heads = nn.logical_to_mesh_axes(("batch", "heads"), RULES)

    def splits(axes, n: int):  # the mesh axes if they divide n, else None (that dimension replicated)
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        return axes if n % math.prod(mesh.shape[a] for a in names) == 0 else None

    spec = P(splits(batch, B), splits(heads, H), None, None)  # e.g. 12 heads over tensor=8: replicated
    if segment_ids is None:
        return per_device(lambda q, k, v: local(q, k, v, None), (q, k, v), (spec,) * 3, spec)
    return per_device(local, (q, k, v, segment_ids), (spec,) * 3 + (P(spec[0], None),), spec)


def kernel_for(kernel: str, *, dtype, K: int, T: int, interpret: bool = False) -> str:
    """`choose_kernel` for the devices being traced for."""
    platform, device_kind = traced_device()
    return choose_kernel(kernel, platform=platform, device_kind=device_kind, dtype=dtype, K=K, T=T,
                         interpret=interpret)


def splash_heads_major(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
                       q_scaled: bool = False, interpret: bool = False) -> jax.Array:
    """Causal splash attention on head-major (B,H,T,K) q, k, v -> (B,H,T,K), the layout the kernel
    reads and writes: a model that projects straight into it (`gpt2.HeadsConv1D`) moves no
    activation between layouts. Splash does not scale the scores: q is scaled by 1/sqrt(K) here
    unless `q_scaled` says its projection did (exact for K=64: 1/8)."""
    if not q_scaled:
        q = q * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
    return _splash(q, k, v, segment_ids, interpret=interpret)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
           kernel: str = "auto", interpret: bool = False) -> jax.Array:
    """Causal self-attention (B,T,H,K) -> (B,T,H,K), within documents when segment_ids (B,T) are given.

    `interpret=True` runs the splash kernel in Pallas' interpreter (tests on CPU).
    """
    T = q.shape[1]
    chosen = kernel_for(kernel, dtype=q.dtype, K=q.shape[3], T=T, interpret=interpret)
    if chosen == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=causal_mask(T, segment_ids), implementation="xla")
    if chosen == "cudnn":
        # The public API has no segment ids. is_causal=True lets cuDNN skip the tiles above the
        # diagonal; the document mask (segment equality only, (B,1,T,T)) enters as an additive
        # bias, read forward and backward (and a dbias written) at T^2 elements per row and layer.
        # cuDNN's packed-sequence path (q_offsets/q_seqlen, no T x T tensor) exists only in
        # jax._src.cudnn, needs Hopper (checked against the local GPU while tracing) and a static
        # bound on documents per row; it is left until a GPU can check it against this path.
        mask = None if segment_ids is None else segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
    heads_major = lambda t: t.transpose(0, 2, 1, 3)
    out = splash_heads_major(heads_major(q), heads_major(k), heads_major(v), segment_ids=segment_ids,
                             interpret=interpret)
    return heads_major(out)
