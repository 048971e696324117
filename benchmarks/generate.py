"""Generation throughput: flax_gpt's JAX KV-cache sampler vs transformers' `generate`, same weights.

distilgpt2 shapes (GPT2Config n_layer=6, n_embd=768, n_head=12, random seeded weights), greedy,
prompts of 16 random tokens, 128 new tokens, batch 1 and batch 8, fp32 on both sides.

  jax           `generate_tokens` (prefill + lax.while_loop decode in one jit); the first call's
                extra time over a steady call is reported as compile time and never counted
  transformers  `GPT2LMHeadModel.generate(do_sample=False)` with its KV cache, torch using every
                core, after one warm-up call

The two sides' timed calls alternate (jax, transformers, jax, ...) so both see the same load.

new tokens/s = batch * 128 / wall time of one call (best of --reps; the machine may be shared).
Both sides must produce all 128 tokens (EOS disabled) and the JSON records whether the greedy
tokens agree. Writes benchmarks/results/generate_<device>.json naming the machine.

usage: python benchmarks/generate.py [--reps 5] [--new-tokens 128] [--batches 1 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _threads_from_argv(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 0


THREADS = _threads_from_argv(sys.argv[1:])
if THREADS == 1:  # must be set before jax initialises its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402


def cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    import torch
    import transformers

    dev = jax.devices()[0]
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "jax_backend": dev.platform, "jax_device_kind": dev.device_kind,
            "jax_devices": jax.device_count(), "python": platform.python_version(), "jax": jax.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
            "load_average_1m_at_start": os.getloadavg()[0]}  # the machine may be shared: context for the figures


def build(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from flax_gpt.config import ModelConfig
    from flax_gpt.model.gpt2 import abstract_params
    from flax_gpt.model.hf import from_hf_state_dict

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(hf_cfg).eval()
    cfg = ModelConfig(preset="distilgpt2", n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                      embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = jax.device_put(from_hf_state_dict(sd, cfg, abstract_params(cfg)))
    return model, cfg, params


def jax_runner(params, cfg, prompts, new_tokens, eos):
    from flax_gpt.generate import generate_tokens

    return lambda: generate_tokens(params, cfg, prompts, max_new_tokens=new_tokens, greedy=True, eos_id=eos)


def torch_runner(model, prompts, new_tokens, eos):
    import torch

    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, eos_token_id=eos, pad_token_id=eos)

    def run():
        with torch.inference_mode():
            return model.generate(ids, **kw)[:, ids.shape[1]:].tolist()

    return run


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=0,
                    help="0: every core on both sides (default); 1: one thread each (torch and XLA), "
                         "a per-core comparison that stays meaningful on a busy host")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/generate_<device>[_threads1].json)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    machine_at_start = machine()
    model, cfg, params = build()
    # transformers gets min_new_tokens so it never stops early; for JAX the JSON records whether
    # every row produced all new tokens (random weights practically never pick EOS greedily).
    eos = 50256
    rows = []
    for batch in args.batches:
        prompts = np.random.default_rng(batch).integers(0, 50000, (batch, args.prompt_len)).tolist()
        run_jax = jax_runner(params, cfg, prompts, args.new_tokens, eos)
        run_torch = torch_runner(model, prompts, args.new_tokens, eos)
        _, first = timed(run_jax)  # compile + one run
        timed(run_torch)  # warm-up
        jt, tt = [], []
        for _ in range(args.reps):  # interleaved, so both sides see the same machine load
            ours, t = timed(run_jax)
            jt.append(t)
            theirs, t = timed(run_torch)
            tt.append(t)
        ours_full = all(len(r) == args.new_tokens for r in ours)
        agree = float(np.mean([a == b for a, b in zip(ours, theirs)]))
        n = batch * args.new_tokens
        j_best, t_best = min(jt), min(tt)
        row = {
            "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "jax": {"new_tokens_per_s": n / j_best, "call_s_best": j_best, "call_s_median": statistics.median(jt),
                    "first_call_s": first, "compile_s": max(first - j_best, 0.0), "calls_s": jt,
                    "all_tokens_generated": ours_full},
            "transformers": {"new_tokens_per_s": n / t_best, "call_s_best": t_best,
                             "call_s_median": statistics.median(tt), "calls_s": tt},
            "speedup": t_best / j_best,
            "greedy_rows_identical": agree,
        }
        rows.append(row)
        print(f"batch {batch}: jax {n / j_best:8.1f} tok/s (compile {row['jax']['compile_s']:.1f}s) | "
              f"transformers {n / t_best:8.1f} tok/s | speedup {row['speedup']:.2f}x | "
              f"greedy rows identical {agree:.0%}", flush=True)

    dev = jax.devices()[0]
    kind = dev.device_kind.replace(" ", "_").lower() if dev.platform != "cpu" else "cpu"
    load_end, cores = os.getloadavg()[0], os.cpu_count() or 1
    result = {"benchmark": "generate", "machine": machine_at_start,
              "model": {"shapes": "distilgpt2", "n_layer": 6, "n_embd": 768, "n_head": 12, "vocab": 50257,
                        "weights": "random (torch.manual_seed(0)), identical on both sides", "dtype": "float32"},
              "decoding": "greedy", "threads": args.threads or "all", "runs": rows,
              # Other work on the host slows both sides, torch's OpenMP threads much more than XLA's:
              # trust speedups only from quiet runs (idle before; at the end, about our own threads only).
              "load_average_1m_at_end": load_end,
              "quiet_host": machine_at_start["load_average_1m_at_start"] < 1.0 and load_end < cores + 1}
    suffix = f"_threads{args.threads}" if args.threads else ""
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"generate_{kind}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
