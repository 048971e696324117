"""Before/after measurements of the speed options, with the bare jitted step (`flax-gpt bench`
without the baseline), on the machine at hand. Writes benchmarks/results/speed_work_<device>.json.

    python benchmarks/speed_work.py [--preset tiny] [--seq-len 128] [--batch 8]

Each option is kept as a default only where this shows it helps; see the README's Performance
section for the decisions. Not imported by tests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax

from flax_gpt.bench.throughput import run_bench
from flax_gpt.config_files import load_config

VARIANTS = {
    "baseline": [],
    "pad_vocab_to_128": ["model.pad_vocab_to=128"],
    "remat": ["model.remat=true"],
    "grad_accum_2": ["train.grad_accum=2"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    kind = jax.devices()[0].device_kind.replace(" ", "_").lower()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            cfg = load_config("configs/tiny.yaml", [
                f"model.preset={args.preset}", "model.n_positions=1024", f"data.seq_len={args.seq_len}",
                f"train.batch_size={args.batch}", "data.synthetic_docs=1000", f"data.shards_dir={tmp}/shards",
                f"train.run_dir={tmp}/run", "train.progress=false", *extra])
            r = run_bench(cfg, steps=args.steps, warmup=2, baseline="none", loop=False, out=f"{tmp}/{name}.json")
            results[name] = {k: r[k] for k in ("tokens_per_sec", "step_time_s", "compile_time_s", "peak_memory_bytes")}
            print(name, json.dumps(results[name]))
    out = Path(f"benchmarks/results/speed_work_{args.preset}_{kind}.json")
    out.write_text(json.dumps({"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                               "shapes": {"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch},
                               "variants": VARIANTS, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
