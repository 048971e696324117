"""PyTorch reference throughput: the family's transformers model (as an export loads) training on the same shapes.

The number flax_gpt's trainer is compared against. One training step is what the JAX step does
with the default optimiser preset: forward with `labels=input_ids` (the model shifts them),
backward, global-norm clipping (`clip_norm`, 1.0 as `optim.clip_norm`; 0 turns it off), AdamW
step, zero_grad. Random tokens, dropout as the config says, model in train mode.

`flax-gpt bench` calls `measure_torch_baseline` for its `baseline` figures. torch is imported only
inside it (deferred: the package never needs torch to train).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import traceback

from flax_gpt.config import ModelConfig
from flax_gpt.model.family import family_of, flops_per_token


def _make_optimizer(torch, params, *, lr: float, weight_decay: float):
    """AdamW, fused where this torch/device supports it, else the multi-tensor (foreach) path."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True), "foreach"


def measure_torch_baseline(
    model_cfg: ModelConfig,
    *,
    seq_len: int,
    batch_size: int,
    steps: int = 10,
    warmup: int = 3,
    compile: bool = False,
    dtype: str = "float32",
    threads: int | None = None,
    clip_norm: float = 1.0,
    seed: int = 0,
) -> dict:
    """Steady-state training throughput of transformers' GPT-2 with this config's shapes.

    Returns {"tokens_per_sec", "step_time_s", "compile", "torch_version", "device", ...} and
    "error" when the run (typically torch.compile) failed; the timings are then None.
    """
    import torch  # deferred: only the baseline needs torch
    import transformers  # deferred with torch

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16 (got {dtype!r})")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {
        "preset": model_cfg.preset,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_step": seq_len * batch_size,
        "steps": steps,
        "warmup": warmup,
        "compile": bool(compile),
        "dtype": dtype,
        "clip_norm": clip_norm,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "flops_per_token": flops_per_token(model_cfg, seq_len),
        "tokens_per_sec": None,
        "step_time_s": None,
        # Other processes on the host skew CPU timings badly; record how busy it was.
        "loadavg_1m_before": os.getloadavg()[0],
    }

    # The config.json an export writes, so the reference is the model transformers would load.
    config_json = family_of(model_cfg).hf_config(model_cfg)
    hf_cfg = transformers.AutoConfig.for_model(config_json.pop("model_type"), **config_json)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device)
    model.train()
    result["params"] = model.num_parameters()
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    opt, result["optimizer"] = _make_optimizer(torch, model.parameters(), lr=5e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    forward = model
    if compile:
        try:
            forward = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any failure is a result to record
            result["error"] = f"torch.compile: {type(e).__name__}: {e}"
            return result

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = forward(input_ids, labels=input_ids).loss
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        t0 = time.perf_counter()
        for _ in range(warmup):  # includes compilation when compile=True
            train_step()
        sync()
        result["warmup_s"] = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = train_step()
            sync()
            times.append(time.perf_counter() - t)
        result["final_loss"] = float(loss.detach())
    except Exception as e:  # noqa: BLE001 - compile errors surface at the first call
        what = "torch.compile" if compile else "train step"
        result["error"] = f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        result["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
        return result

    result["loadavg_1m_after"] = os.getloadavg()[0]
    step_time = statistics.median(times)  # the same statistic as flax_gpt.bench.throughput.measure_step
    result["step_time_s"] = step_time
    result["step_time_mean_s"] = statistics.fmean(times)
    result["step_times_s"] = times
    result["tokens_per_sec"] = batch_size * seq_len / step_time
    result["model_tflops_per_sec"] = result["tokens_per_sec"] * result["flops_per_token"] / 1e12
    return result

