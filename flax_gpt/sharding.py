"""Mesh axes, the one logical->mesh rules table, and shardings derived from an abstract init.

Parameters name their logical axes where they are created (each family's module in model/). Everything else (optimizer
state, batches) gets its sharding derived here, never written by hand elsewhere.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_gpt.config import MeshConfig
from flax_gpt.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over


def batch_shards(mesh_sizes) -> int:
    """How many parts a batch is split into, from a mesh's {axis: size} (a Mesh's `shape`, or a
    compile result's "mesh")."""
    return math.prod(mesh_sizes[a] for a in BATCH_AXES)

# Logical axis -> mesh axes. Batch is split over data and fsdp (FSDP is data parallelism with
# sharded parameters); the width "embed" is what FSDP shards; tensor parallelism splits the
# vocab, the fused qkv columns, the MLP width and the attention output rows (Megatron style).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("pos", None),
    ("norm", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check that the mesh uses exactly the devices there are."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(AXES, sizes))} cannot fill {n_devices} devices ({n_devices} is not "
                f"divisible by {known}); choose axis sizes whose product divides the device count"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n_devices} are available; set mesh.data=-1 or sizes whose product is {n_devices}"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    grid = np.asarray(devices).reshape(shape)
    if devices[0].platform != "cpu":  # physical-topology-aware order on TPU/GPU (the same on every process)
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):  # a shape the topology cannot tile
            pass
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, T) batches: B over data x fsdp, T replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


# Activations are split like the batches: the residual stream (B, T, D) over the batch only, the
# logits (B, T, V) also over the vocab's tensor axis. Pinned in the model (`constrain`): left to
# XLA's propagation, an FSDP-sharded parameter's layout (width split over fsdp) can win and drop
# the batch split, so every device computes the whole batch (seen compiling for TPU: fsdp=4 held
# 4.9x the temporaries of data=4 and did 1.2x the FLOPs).
ACTIVATIONS = {"residual": P(BATCH_AXES, None, None), "logits": P(BATCH_AXES, None, "tensor")}


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """Pin an activation's sharding when traced on a mesh (`on_mesh`); unchanged otherwise."""
    return x if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(x, ACTIVATIONS[kind])


def on_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the context mesh, so the model's `constrain` calls apply; jit it."""
    @functools.wraps(fn)  # keeps the signature: jit's donate_argnames find the arguments by name
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    traced.__name__ = getattr(fn, "__name__", None) or fn.func.__name__  # a functools.partial: its function's
    return traced


def per_device(f, args: tuple, in_specs, out_specs):
    """f on each device's own shards of args (a Pallas kernel cannot be split by XLA, which would
    gather whole operands onto every device), or f itself when traced off a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return f(*args)
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(mesh: Mesh, boxed_abstract_params) -> dict:
    """NamedShardings for the params tree from its logical axis names and RULES."""
    specs = nn.get_partition_spec(boxed_abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def abstract_on(tree, shardings):
    """`tree`'s arrays as ShapeDtypeStructs carrying `shardings`: a restore or compile target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def check_divisible(abstract_params, shardings) -> None:
    """Every sharded dimension must split evenly over its mesh axes: fail before compiling."""
    flat_p = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_s = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat_p, flat_s):
        for dim, axes in zip(leaf.shape, sh.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            size = math.prod(sh.mesh.shape[a] for a in axes)
            if dim % size:
                name = jax.tree_util.keystr(path, simple=True, separator=".")
                hint = " (set model.pad_vocab_to=128)" if name.endswith("embedding") and dim % 128 else ""
                raise ConfigError(
                    f"parameter {name} dimension {dim} is not divisible by mesh axes {axes} of size "
                    f"{size}; change the mesh sizes{hint}"
                )


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings_like_params(tree, abstract_params, p_shardings, mesh: Mesh):
    """Shardings for a pytree whose leaves mirror params (e.g. AdamW mu/nu): a leaf whose dict
    path ends with a parameter's path and has its shape gets that parameter's sharding; every
    other leaf (step counters, masked placeholders) is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        jax.tree_util.tree_leaves(p_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)),
    ):
        by_path[_dict_keys(path)] = (tuple(leaf.shape), sh)
    rep = replicated(mesh)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, tree)
