"""`flax-gpt compile`: compile the real train step for a Cloud TPU slice on any host, no TPU needed.

libtpu (`pip install -e ".[tpu]"`, or TPU_LIBRARY_PATH pointing at a libtpu.so) is loaded as a
*compiler* only: `jax.experimental.topologies` makes compile-only devices of the slice, the config's
mesh is laid over them, and the train step jitted by `StateBuilder` is lowered and compiled with
abstract inputs. Nothing runs, so what comes out is what XLA:TPU planned, not a measurement:

- per-device HBM, from the leaf shard shapes (params, optimizer state) and the compiler's
  `memory_analysis()` (temporaries; the total is max(peak_memory_in_bytes, arguments + outputs -
  donated aliases + temporaries + code): the compiler's high-water mark does not always cover the
  buffer sum, so the larger is reported);
- FLOPs per device per step from `cost_analysis()` next to ours (`flops.flops_per_token`);
- a roofline *estimate* of the step time: max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth),
  on figures a kernel or a loop cannot shrink (`roofline.py`: the larger of XLA's and the formula's
  FLOPs; XLA's bytes plus what its cost analysis leaves out of Pallas kernels and loop trips).
  Collectives over ICI/DCN and imperfect overlap are not in it, and `bytes accessed` is the
  compiler's operand-and-output sum, an upper bound on HBM traffic;
- with `--find-max-batch`, the largest batch that fits, proven by two compiles (`max_batch.py`).
"""

from __future__ import annotations

import math
import os
import re
import time

import jax
import numpy as np
from jax._src import hardware_utils  # counts attached TPU chips (PCI ids) without loading libtpu
from jax.experimental import topologies

from flax_gpt.bench.max_batch import search_max_batch
from flax_gpt.bench.roofline import hidden_bytes, layout_copies, step_estimate
from flax_gpt.config import Config
from flax_gpt.errors import ConfigError
from flax_gpt.model import flops
from flax_gpt.model.family import flops_per_token
from flax_gpt.process import wait_interruptibly
from flax_gpt.sharding import batch_shards
from flax_gpt.train.state import StateBuilder

GiB = 1024**3

# Cloud TPU accelerator type -> (libtpu topology name, get_topology_desc keyword arguments).
# v5e/v6e names count chips (one TensorCore each). v4/v5p names count TensorCores, two per chip,
# run as ONE jax device ("megacore"): v4-8 is 4 chips. v4 must be asked for megacore (libtpu
# defaults to "legacy": two devices per chip with half the HBM each); v5p is megacore already.
# libtpu assumes 4 chips per host (2x2x1); single-host v5e/v6e slices of 1 and 8 chips say so.
_MC = {"chip_config_name": "megacore"}
ACCELERATORS: dict[str, tuple[str, dict]] = {
    "v5e-1": ("v5e:1x1", {"chips_per_host_bounds": [1, 1, 1]}),
    "v5e-4": ("v5e:2x2", {}),
    "v5e-8": ("v5e:2x4", {"chips_per_host_bounds": [2, 4, 1]}),
    "v5e-16": ("v5e:4x4", {}),
    "v5e-32": ("v5e:4x8", {}),
    "v5e-64": ("v5e:8x8", {}),
    "v5e-128": ("v5e:8x16", {}),
    "v5e-256": ("v5e:16x16", {}),
    "v6e-1": ("v6e:1x1", {"chips_per_host_bounds": [1, 1, 1]}),
    "v6e-4": ("v6e:2x2", {}),
    "v6e-8": ("v6e:2x4", {"chips_per_host_bounds": [2, 4, 1]}),
    "v6e-16": ("v6e:4x4", {}),
    "v6e-32": ("v6e:4x8", {}),
    "v6e-64": ("v6e:8x8", {}),
    "v6e-128": ("v6e:8x16", {}),
    "v6e-256": ("v6e:16x16", {}),
    "v4-8": ("v4:2x2x1", _MC),
    "v4-16": ("v4:2x2x2", _MC),
    "v4-32": ("v4:2x2x4", _MC),
    "v4-64": ("v4:2x4x4", _MC),
    "v4-128": ("v4:4x4x4", _MC),
    "v4-256": ("v4:4x4x8", _MC),
    "v4-512": ("v4:4x8x8", _MC),
    "v4-1024": ("v4:8x8x8", _MC),
    "v5p-8": ("v5p:2x2x1", {}),
    "v5p-16": ("v5p:2x2x2", {}),
    "v5p-32": ("v5p:2x2x4", {}),
    "v5p-64": ("v5p:2x4x4", {}),
    "v5p-128": ("v5p:4x4x4", {}),
    "v5p-256": ("v5p:4x4x8", {}),
    "v5p-512": ("v5p:4x8x8", {}),
    "v5p-1024": ("v5p:8x8x8", {}),
}
_ALIASES = {"v5litepod": "v5e"}  # Cloud TPU calls v5e slices v5litepod-N too

# Per generation: HBM per device as XLA:TPU budgets it (the "available HBM" of its own
# out-of-memory message, G = GiB; a little under the chip's 16/32/95/32 GiB) and the documented HBM
# bandwidth (https://cloud.google.com/tpu/docs/<v4|v5e|v5p|v6e>). Peak FLOP/s come from
# flops.PEAK_FLOPS by the devices' device_kind.
HBM_BYTES = {"v4": int(30.75 * GiB), "v5e": int(15.75 * GiB), "v5p": int(95.74 * GiB), "v6e": int(31.25 * GiB)}
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}

_RAW = re.compile(r"^(v4|v5e|v5litepod|v5p|v6e):(\d+(?:x\d+){1,2})$")
_OOM_TEMP = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")
_OOM_USED = re.compile(r"Used ([\d.]+)G of ([\d.]+)G hbm")


def known_names() -> str:
    return ", ".join(list(ACCELERATORS) + ["v5litepod-N", "or vX:AxB[xC] (vX = v4, v5e, v5p, v6e)"])


def resolve(topology: str) -> tuple[str, str, dict]:
    """A Cloud TPU name (v5e-8, v4-32, v5litepod-16) or shape (v5e:2x4) -> (generation, libtpu
    topology name, get_topology_desc kwargs). A shape that names a table entry gets its settings."""
    name = topology.strip().lower()
    for alias, gen in _ALIASES.items():
        if name.startswith(alias):
            name = gen + name[len(alias):]
    if name in ACCELERATORS:
        shape, kw = ACCELERATORS[name]
        return name.split("-")[0], shape, kw
    m = _RAW.match(name)
    if not m:
        raise ConfigError(f"unknown TPU topology {topology!r}; known: {known_names()}")
    gen, dims = m.group(1), m.group(2)
    if gen in ("v4", "v5p") and dims.count("x") == 1:
        dims += "x1"  # 3-D torus generations: 2x2 is 2x2x1
    shape = f"{gen}:{dims}"
    for table_shape, kw in ACCELERATORS.values():
        if table_shape == shape:
            return gen, shape, kw
    return gen, shape, _MC if gen == "v4" else {}


def topology_devices(topology: str) -> tuple[str, str, list]:
    """(generation, libtpu topology name, compile-only TPU devices of the slice). Needs libtpu, not a TPU."""
    gen, shape, kw = resolve(topology)
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        # No TPU attached: libtpu would print ~6 lines about an undeterminable accelerator type and
        # worker hostnames; the first two settings silence it without changing what is compiled
        # (checked). With no TPU to guard, its one-process-per-host lock (/tmp/libtpu_lockfile)
        # would only stop two compiles from running side by side.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = list(topologies.get_topology_desc(shape, "tpu", **kw).devices)
    except RuntimeError as e:
        if "not installed" in str(e):  # jax: "JAX TPU support not installed; cannot generate TPU topology"
            raise ConfigError('compiling for TPU needs libtpu: pip install -e ".[tpu]" (or set '
                              "TPU_LIBRARY_PATH to a libtpu.so)") from None
        raise ConfigError(f"libtpu cannot make topology {shape} {kw or ''}: {' '.join(str(e).split())}") from None
    return gen, shape, devices


def with_batch(cfg: Config, batch: int) -> Config:
    return cfg.replace(train={"batch_size": int(batch)})


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_step(cfg: Config, gen: str, devices: list, *, say=None) -> dict:
    """Compile the train step for `devices` and report memory, FLOPs and the roofline estimate.
    A program the compiler refuses for lack of HBM comes back with fits=False, not an exception.
    `say` gets a line as each phase begins (XLA:TPU alone takes minutes for a large model)."""
    say = say or (lambda *_: None)
    # The run length only shapes the learning-rate curve (constants), not the program's memory.
    b = StateBuilder(cfg, cfg.train.steps or 1000, devices=devices)
    B, T, n = cfg.train.batch_size, cfg.data.seq_len, len(devices)
    # The first line comes once the state is built: a config the mesh cannot take gets only its error line.
    say(f"abstract state built (mesh {dict(b.mesh.shape)}, batch {B} x {T}); lowering the train step")
    kind = devices[0].device_kind
    params, opt = _bytes_per_device(b.abstract.params), _bytes_per_device(b.abstract.opt_state)
    capacity = HBM_BYTES[gen]
    chips = {(getattr(d, "slice_index", 0), *d.coords) for d in devices}
    out = {"device_kind": kind, "devices": n, "chips": len(chips), "hosts": len({d.process_index for d in devices}),
           "mesh": dict(b.mesh.shape), "batch_size": B, "seq_len": T, "dtype": cfg.model.dtype,
           "remat": cfg.model.remat, "compiler": getattr(devices[0].client, "platform_version", None)}
    t0 = time.perf_counter()
    lowered = b.step_fn.lower(b.abstract, b.abstract_batch())
    say("compiling with XLA:TPU (the long part: minutes for a large model on a small host)")
    try:
        compiled = wait_interruptibly(lowered.compile)  # SIGTERM and Ctrl-C stop it at once
    except Exception as e:  # XLA's runtime error; only its out-of-memory form is ours
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The compiler gave up for lack of HBM; its message says what it wanted (G = GiB), either
        # the temporaries alone or everything.
        args = params + opt + _bytes_per_device(b.abstract_batch())
        temp, total = 0, args
        if m := _OOM_TEMP.search(str(e)):
            temp, capacity = int(float(m.group(1)) * GiB), int(float(m.group(2)) * GiB)
            total = args + temp
        elif m := _OOM_USED.search(str(e)):
            total, capacity = max(args, int(float(m.group(1)) * GiB)), int(float(m.group(2)) * GiB)
            temp = total - args
        total = max(total, capacity + 1)  # it did not fit, whatever the message left out
        ma, ca, hidden, copies = None, {}, None, None
    else:
        say("analysing memory and FLOPs")
        ma, ca = compiled.memory_analysis(), compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else (ca or {})  # older jax: [dict]
        temp = ma.temp_size_in_bytes
        total = max(ma.peak_memory_in_bytes, ma.argument_size_in_bytes + ma.output_size_in_bytes
                    - ma.alias_size_in_bytes + temp + ma.generated_code_size_in_bytes)
        text = compiled.as_text()
        hidden = hidden_bytes(text)  # what cost_analysis leaves out (kernels, loop trips)
        copies = layout_copies(text)
        del compiled
    formula = flops_per_token(cfg.model, T) * B * T / n
    peak, bw = flops.peak_flops(kind), HBM_BANDWIDTH[gen]
    xla = ca.get("flops")
    used = step_estimate(xla_flops=xla, formula_flops=formula, xla_bytes=ca.get("bytes accessed"), hidden=hidden,
                         peak=peak, bandwidth=bw)
    est = used["est_step_time_s"]
    out.update({
        "compiled": ma is not None,
        "hbm_per_device_bytes": {"params": params, "opt_state": opt, "temp": temp, "total": int(total)},
        "hbm_capacity_bytes": capacity, "fits": ma is not None and total <= capacity,
        "flops_per_device_step_xla": xla, "flops_per_device_step_formula": formula,
        "bytes_accessed_per_device_step_xla": ca.get("bytes accessed"), **used, "layout_copies": copies,
        "peak_flops_per_device": peak, "hbm_bandwidth_bytes_per_s": bw,
        "est_tokens_per_sec": B * T / est if est else None, "est_mfu": formula / (est * peak) if est else None,
        "estimate": "roofline max(FLOPs/peak, bytes/HBM bandwidth) on the *_used figures; no collectives; "
                    "compiled for, not run on",
        "compile_time_s": round(time.perf_counter() - t0, 2),
    })
    return out


def compile_for_topology(cfg: Config, topology: str, *, find_max_batch: bool = False, max_compiles: int = 12,
                         time_budget_s: float | None = None, say=None) -> dict:
    """The `flax-gpt compile` JSON for this config on this slice (see the module docstring).
    `say` gets the progress: a line per phase, and per compile of the batch search, with the
    seconds since the start. A batch search stopped by Ctrl-C returns what it proved so far,
    with "interrupted": true."""
    t0, say = time.perf_counter(), say or (lambda *_: None)

    def phase(line: str) -> None:
        say(f"compile [{time.perf_counter() - t0:7.1f} s]: {line}")

    gen, shape, devices = topology_devices(topology)
    result = {"topology": topology, "topology_shape": shape, **compile_step(cfg, gen, devices, say=phase)}
    shards = batch_shards(result["mesh"])
    unit = shards * cfg.train.grad_accum  # every batch shard gets whole micro-batches
    if not find_max_batch or cfg.train.batch_size % unit:  # else the search's first line says this
        phase(f"{result['hbm_per_device_bytes']['total'] / GiB:.2f} of {result['hbm_capacity_bytes'] / GiB:.2f} GiB "
              f"per device, {'fits' if result['fits'] else 'does not fit'} (lowered and compiled in "
              f"{result['compile_time_s']} s)")
    if find_max_batch:
        def probe(batch: int) -> dict:
            if batch == cfg.train.batch_size:
                return result
            phase(f"batch {batch}: compiling with XLA:TPU")
            return compile_step(with_batch(cfg, batch), gen, devices)

        found = search_max_batch(probe, cfg.train.batch_size, unit, result["hbm_capacity_bytes"],
                                 max_compiles=max_compiles, time_budget_s=time_budget_s, say=phase)
        result["max_batch"] = found["max_batch"]
        result["max_batch_search"] = {
            "compiles": found["compiles"], "exact": found["exact"], "stopped": found["stopped"],
            "proof": found["proof"], "batch_multiple": unit,
            "tried": {str(k): {"fits": v["fits"], "recomputes": found["recomputes"][k],
                               "hbm_total": v["hbm_per_device_bytes"]["total"], "compile_time_s": v["compile_time_s"]}
                      for k, v in sorted(found["results"].items())}}
        if found["stopped"] == "interrupted":
            result["interrupted"] = True
        why = {"max_compiles": "max_compiles reached", "time_budget": "time budget spent", "interrupted": "Ctrl-C"}
        phase(f"largest batch that fits: {found['max_batch']} ({found['compiles']} compiles" +
              (f"; the next multiple, {found['proof']['next']}, {found['proof']['next_is']})" if found["exact"] else
               f"; stopped, {why[found['stopped']]}: not proven the largest)"))
    return result


def fit_problem(result: dict) -> str | None:
    """One line saying by how much a compiled config misses the HBM and what to try; None if it fits."""
    if result["fits"]:
        return None
    need, cap = result["hbm_per_device_bytes"]["total"], result["hbm_capacity_bytes"]
    fixed = result["hbm_per_device_bytes"]["params"] + result["hbm_per_device_bytes"]["opt_state"]
    best = result.get("max_batch")
    tip = ("--find-max-batch finds the largest batch that fits" if best is None else
           f"the largest batch that fits is {best}" if best else "no batch fits with this mesh")
    more = ([] if result["mesh"]["data"] == 1 else ["shard them over mesh.fsdp (e.g. mesh.fsdp=-1 mesh.data=1)"]) + \
        ([] if result.get("remat") == "full" else
         ["set model.remat=full"] if result.get("remat") in ("minimal", "save_attention") else
         ["set model.remat=save_attention (or full: least memory)"])
    return (f"does not fit: {need / GiB:.2f} GiB per device needed, {cap / GiB:.2f} GiB available on "
            f"{result['topology']} ({(need - cap) / GiB:.2f} GiB over; parameters + optimizer state "
            f"{fixed / GiB:.2f} GiB); {tip}" + "".join(f"; or {m}" for m in more))

