"""The sharded training state in one place: how it is laid out over the mesh, created fresh,
restored from a checkpoint, or imported (a Hugging Face model or another run's weights).

`StateBuilder` holds what a run computes with, built once knowing the run length: the mesh, the
model, the optimizer and schedule, the state's shardings derived from an abstract init, and the
train step jitted with those shardings. Nothing here writes to disk.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt.config import Config
from flax_gpt.errors import ConfigError
from flax_gpt.model.family import abstract_params, init_params, load_hf, model
from flax_gpt.presets import GPT2_EOS_ID
from flax_gpt.sharding import (
    abstract_on,
    batch_sharding,
    batch_shards,
    check_divisible,
    make_mesh,
    on_mesh,
    param_shardings,
    replicated,
    tree_shardings_like_params,
)
from flax_gpt.train.checkpoint import Checkpointer
from flax_gpt.train.host_memory import check_host_memory, n_params, training_need
from flax_gpt.train.optim import build_optimizer, make_schedule
from flax_gpt.train.run_dir import RunDir, check_same_architecture
from flax_gpt.train.step import TrainState, train_step

# What to change when a training state does not fit in host memory.
_SMALLER = ("use a smaller model (model.preset, model.n_layer, model.n_embd), shard it over the devices with "
            "mesh.fsdp (each CPU device holds its own copy of what is replicated), or a host with more memory")


def place(tree, shardings):
    """Host numpy arrays (identical on every process) -> global jax.Arrays with these shardings."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), tree, shardings)


class StateBuilder:
    """Mesh, model, optimizer, state shardings and the jitted step for a config and run length.

    `devices` (default: all of them) may be devices of a TPU topology one only compiles for;
    `eos_id` is the shards' document separator (the document mask is derived from it)."""

    def __init__(self, cfg: Config, total_steps: int, *, devices=None, eos_id: int = GPT2_EOS_ID):
        self.cfg, self.total_steps = cfg, int(total_steps)
        self.mesh = make_mesh(cfg.mesh, devices)
        self.model = model(cfg.model)
        self.schedule = make_schedule(cfg.optim, self.total_steps)
        self.tx = build_optimizer(cfg.optim, self.total_steps)
        boxed = abstract_params(cfg.model, boxed=True)
        self.abstract_params = nn.unbox(boxed)
        self.param_sh = param_shardings(self.mesh, boxed)
        check_divisible(self.abstract_params, self.param_sh)  # before anything is compiled
        rep = replicated(self.mesh)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_sh = tree_shardings_like_params(abstract_opt, self.abstract_params, self.param_sh, self.mesh)
        self.shardings = TrainState(step=rep, params=self.param_sh, opt_state=opt_sh, rng=rep)
        self.abstract = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            params=abstract_on(self.abstract_params, self.param_sh),
            opt_state=abstract_on(abstract_opt, opt_sh),
            rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep))
        need, parts = training_need(self.abstract.params, self.abstract.opt_state)  # before allocating any of it
        check_host_memory(need, parts, f"training {cfg.model.n_layer} layers x {cfg.model.n_embd} wide "
                          f"({n_params(self.abstract_params) / 1e9:.2f}B parameters) on CPU", fix=_SMALLER)
        self.batch_sh = batch_sharding(self.mesh)
        shards = batch_shards(self.mesh.shape)
        micro = cfg.train.batch_size // cfg.train.grad_accum
        if micro % shards:
            raise ConfigError(f"micro-batch {micro} (train.batch_size / train.grad_accum) is not divisible by the "
                              f"{shards} batch shards (mesh.data x mesh.fsdp); change train.batch_size or the mesh")
        step = functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                                 grad_accum=cfg.train.grad_accum, document_mask=cfg.data.document_mask,
                                 eos_id=eos_id)
        self.step_fn = jax.jit(on_mesh(step, self.mesh), in_shardings=(self.shardings, self.batch_sh),
                               out_shardings=(self.shardings, rep), donate_argnames=("state",))

    def abstract_batch(self) -> dict:
        """The batch as ShapeDtypeStructs with its sharding (for ahead-of-time compilation)."""
        shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
        dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
        return {k: jax.ShapeDtypeStruct(shape, d, sharding=self.batch_sh) for k, d in dtypes.items()}

    def fresh(self, params=None, step: int = 0) -> TrainState:
        """A new state made by one jitted function with out_shardings: already sharded, never
        materialised whole on one device, and valid multi-host (no host-to-global device_put)."""
        seed = self.cfg.train.seed

        def build(p):
            init_key, state_key = jax.random.split(jax.random.key(seed))
            if p is None:
                p = nn.unbox(init_params(self.cfg.model, init_key))
            return TrainState(step=jnp.asarray(step, jnp.int32), params=p, opt_state=self.tx.init(p), rng=state_key)

        if params is None:
            return jax.jit(lambda: build(None), out_shardings=self.shardings)()
        return jax.jit(build, in_shardings=(self.param_sh,), out_shardings=self.shardings)(params)

    def restore_or_init(self, ckpt: Checkpointer, say=print) -> TrainState:
        """Resume from the newest readable checkpoint, else start from model.init_from, else init."""
        a = self.abstract
        key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # stored as raw uint32
        rng = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=self.shardings.rng)
        restored = ckpt.restore_latest_good(a.params, a.opt_state, rng) if ckpt.steps() else None
        if restored is not None:
            step = restored["meta"]["step"]
            if "opt_state" not in restored:  # an imported checkpoint: weights only
                say(f"starting from the weights of checkpoint {step} (no optimizer state in it)")
                return self.fresh(restored["params"], step=step)
            say(f"resuming from checkpoint {step}")
            step_arr = jax.jit(lambda: jnp.asarray(step, jnp.int32), out_shardings=self.shardings.step)()
            return TrainState(step=step_arr, params=restored["params"], opt_state=restored["opt_state"],
                              rng=restored["rng"])
        if self.cfg.model.init_from:
            return self.fresh(self.params_from(self.cfg.model.init_from, say))
        return self.fresh()

    def params_from(self, source: str, say=print):
        """Parameters of another run directory or an HF folder/Hub id, placed on this mesh."""
        run = RunDir(source)
        if run.has_config():  # another run directory
            src_cfg, params, step, _ = run.load_params(mesh=self.mesh)
            check_same_architecture(self.cfg.model, src_cfg.model, source)
            say(f"initialised from {source} (step {step})")
            return params  # restored onto this mesh with the same rules: already placed
        hf_cfg, params = load_hf(source, lambda c: self.abstract_params,
                                 dtype=self.cfg.model.dtype, pad_vocab_to=self.cfg.model.pad_vocab_to)
        check_same_architecture(self.cfg.model, hf_cfg, source)
        say(f"initialised from Hugging Face weights: {source}")
        return place(params, self.param_sh)


def total_steps(cfg: Config, train_rows: int) -> int:
    """The run length: train.steps, or train.epochs over the training split."""
    if cfg.train.steps:
        return cfg.train.steps
    return max(1, math.ceil(cfg.train.epochs * train_rows / cfg.train.batch_size))
