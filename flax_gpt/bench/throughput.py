"""`flax-gpt bench`: training throughput of the jitted step and of the whole loop, with MFU, against
transformers' PyTorch GPT-2 on the same shapes and machine.

Timing: compilation is measured on its own (lower + compile). Steady state is `steps` steps after
`warmup`, each synchronised with `block_until_ready`, so the figure is device time per step, not
host dispatch time. Each side runs its steps back to back, ours first, then the baseline's, in
the same process; the step time is the median on both sides, which a few steps slowed by other
work on a shared host do not move. (Alternating single steps of the two was tried: our steps
then ran about 12% slower than alone, the baseline's did not, so it would not be a fair timing.)
Batches are real shards (synthetic or configured corpus) placed on the device before timing, so the data path
is not in the bare figure; the loop figure (`Trainer.fit` on the same shapes, with data loading,
prefetch, metrics fetched one step late and written, no evaluation or periodic checkpoint) shows
what the loop around the step costs.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from flax_gpt import storage
from flax_gpt.bench.torch_baseline import measure_torch_baseline
from flax_gpt.config import Config
from flax_gpt.data.loader import TrainLoader
from flax_gpt.model import flops
from flax_gpt.model.attention import kernel_for
from flax_gpt.model.family import flops_per_token
from flax_gpt.model.loss import choose_kernel as loss_kernel_for
from flax_gpt.sharding import mesh_shape
from flax_gpt.train.inputs import ensure_shards, open_splits
from flax_gpt.train.metric_keys import LOSS
from flax_gpt.train.state import StateBuilder, total_steps
from flax_gpt.train.trainer import Trainer


def _device_memory_peak() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats (CPU)
        return None
    return stats.get("peak_bytes_in_use")


def measure_step(cfg: Config, *, steps: int, warmup: int) -> dict:
    """Compile time and per-step times (median as the step time) of the bare jitted train step."""
    ensure_shards(cfg)
    train_rows, _ = open_splits(cfg)
    builder = StateBuilder(cfg, total_steps(cfg, train_rows.num_rows), eos_id=train_rows.eos_id)
    state = builder.fresh()
    loader = TrainLoader(train_rows, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                         document_mask=cfg.data.document_mask, packing=cfg.data.packing, sharding=builder.batch_sh)
    batches = [loader.global_batch(i) for i in range(min(4, warmup + steps))]
    t0 = time.perf_counter()
    compiled = builder.step_fn.lower(state, batches[0]).compile()
    compile_time = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"compile_time_s": compile_time, "step_time_s": statistics.median(times),
            "step_time_mean_s": statistics.fmean(times), "step_times_s": times, "loss": float(m[LOSS])}


def measure_loop(cfg: Config, *, steps: int) -> dict:
    """Tokens/s of the full training loop (Trainer.fit) on the same shapes, in a scratch run dir.

    Median step time, as the bare step; the mean is kept alongside."""
    with tempfile.TemporaryDirectory() as tmp:
        loop_cfg = cfg.replace(train={"run_dir": tmp, "progress": False, "eval_every": 0},
                               checkpoint={"every": 0})
        train_rows, val_rows = open_splits(loop_cfg)
        builder = StateBuilder(loop_cfg, steps, eos_id=train_rows.eos_id)
        out = Trainer(loop_cfg, builder, say=lambda *_: None).fit(train_rows, val_rows, final_eval=False)
    median = out.get("step_time_median_s")
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return {"tokens_per_sec": tokens / median if median else None, "step_time_s": median,
            "tokens_per_sec_mean": out.get("tokens_per_sec"), "step_time_mean_s": out.get("step_time_s")}


def kernels_used(cfg: Config) -> dict:
    """The attention and loss kernels the train step runs on this machine's devices (what `auto`
    resolves to, or the configured kernel), as the step itself chooses them."""
    m, T = cfg.model, cfg.data.seq_len
    data, fsdp, tensor = mesh_shape(cfg.mesh, jax.device_count())
    attention = ("xla (attention dropout)" if m.attn_pdrop > 0 else
                 kernel_for(m.attention, dtype=jnp.dtype(m.dtype), K=m.n_embd // m.n_head, T=T))
    loss = loss_kernel_for("auto", platform=jax.devices()[0].platform, B=cfg.train.batch_size // cfg.train.grad_accum,
                           T=T, batch_shards=data * fsdp, vocab_shards=tensor)
    return {"attention": attention, "loss": loss}


def run_bench(cfg: Config, *, steps: int = 10, warmup: int = 2, baseline: str = "eager",
              loop: bool = True, out: str | None = None) -> dict:
    if out:  # before measuring: never a file of a run, shards folder or export (a run's config.yaml...)
        storage.check_output_file(out, "--out")
    n_dev = jax.device_count()
    kind = jax.devices()[0].device_kind
    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    step = measure_step(cfg, steps=steps, warmup=warmup)
    tokens_per_sec = batch * seq / step["step_time_s"]
    fpt = flops_per_token(cfg.model, seq)
    result = {
        "device_kind": kind, "num_devices": n_dev, "platform": jax.devices()[0].platform,
        "host": {"machine": platform.machine(), "processor": platform.processor() or None,
                 "python": platform.python_version()},
        "jax_version": jax.__version__,
        "config": {"preset": cfg.model.preset, "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
                   "vocab": cfg.model.padded_vocab, "dtype": cfg.model.dtype, "seq_len": seq,
                   "batch_size": batch, "grad_accum": cfg.train.grad_accum, "remat": cfg.model.remat,
                   "attention": cfg.model.attention, "mesh": dataclasses.asdict(cfg.mesh)},
        "kernels": kernels_used(cfg),
        "steps": steps, "warmup": warmup,
        "compile_time_s": step["compile_time_s"],
        "step_time_s": step["step_time_s"],
        "step_time_mean_s": step["step_time_mean_s"],
        "step_times_s": step["step_times_s"],
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_device": tokens_per_sec / n_dev,
        "flops_per_token": fpt,
        "mfu": flops.mfu(tokens_per_sec / n_dev, fpt, kind),
        "peak_memory_bytes": _device_memory_peak(),
    }
    if loop:
        lp = measure_loop(cfg, steps=max(steps + warmup + 2, 8))
        result["loop"] = {**lp, "ratio_to_bare_step": (lp["tokens_per_sec"] or 0) / tokens_per_sec}
    result["baseline"] = _baseline(cfg, baseline, steps=steps, warmup=warmup, ours=tokens_per_sec)
    path = Path(out) if out else Path("benchmarks/results") / (
        f"train_{cfg.model.preset}_seq{seq}_b{batch}_{kind.replace(' ', '_').lower()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["written_to"] = str(path)
    return result


def _baseline(cfg: Config, mode: str, *, steps: int, warmup: int, ours: float) -> dict | None:
    """The family's transformers model + torch AdamW on the same shapes: eager and/or torch.compile."""
    if mode == "none":
        return None
    runs = {}
    for name in (("eager", "compile") if mode == "both" else (mode,)):
        runs[name] = measure_torch_baseline(
            cfg.model, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size, steps=steps,
            warmup=warmup, compile=name == "compile", dtype=cfg.model.dtype, clip_norm=cfg.optim.clip_norm)
    best = max((r for r in runs.values() if r.get("tokens_per_sec")), key=lambda r: r["tokens_per_sec"], default=None)
    head = runs.get("eager") or best or {}
    tps = head.get("tokens_per_sec")
    return {"tokens_per_sec": tps, "ratio": (ours / tps) if tps else None, "runs": runs,
            "best_tokens_per_sec": best and best["tokens_per_sec"],
            "ratio_to_best": (ours / best["tokens_per_sec"]) if best else None}
