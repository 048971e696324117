"""Host memory a model needs, checked before any of it is allocated.

A model too large for the host does not fail by itself: it allocates until the machine swaps or
the kernel's OOM killer ends the process, minutes later, with no word on what to change. So the
bytes that will sit in host memory are summed from the abstract state (shapes, dtypes and
shardings: nothing allocated) and compared with what the kernel says is available (MemAvailable
in /proc/meminfo; on a system without it nothing is checked).

What sits in host memory: on CPU devices, every local device's share of the parameters, their
gradients and the optimizer state (a replicated leaf once per device). Activations and compiled
buffers come on top, so the estimate is a lower bound: a run refused by it could never fit. On
accelerators the state lives in device memory, and XLA's own out-of-memory error speaks for it.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from flax_gpt.errors import ResourceError

GiB = 1024**3
MEMINFO = "/proc/meminfo"


def available_bytes(meminfo: str = MEMINFO) -> int | None:
    """Memory the kernel can give new allocations without swapping (MemAvailable), None if unknown."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_bytes(tree) -> int:
    """Bytes the devices of this process hold of a tree of ShapeDtypeStructs carrying shardings."""
    me = jax.process_index()
    total = 0
    for x in jax.tree.leaves(tree):
        mine = sum(d.process_index == me for d in x.sharding.device_set)
        total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize * mine
    return total


def on_cpu(tree) -> bool:
    return all(d.platform == "cpu" for x in jax.tree.leaves(tree) for d in x.sharding.device_set)


def training_need(params, opt_state) -> tuple[int, str]:
    """(bytes, what they are) of host memory a training state needs on this process; `params` and
    `opt_state` are abstract, with shardings. Nothing on accelerators."""
    if not on_cpu(params):
        return 0, ""
    p = local_bytes(params)
    parts = [(p, "parameters"), (p, "gradients"), (local_bytes(opt_state), "optimizer state")]
    return sum(b for b, _ in parts), ", ".join(f"{what} {b / GiB:.1f}" for b, what in parts)


def check_host_memory(need: int, parts: str, what: str, *, fix: str, available: int | None = None) -> None:
    """Refuse with one line when `need` bytes exceed the host's available memory."""
    available = available_bytes() if available is None else available
    if need and available is not None and need > available:
        raise ResourceError(f"{what} needs at least {need / GiB:.1f} GiB of host memory ({parts} GiB) but "
                            f"{available / GiB:.1f} GiB is available; {fix}")


def n_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
