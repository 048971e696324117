"""Training throughput harness: `flax-gpt bench` for the presets and shapes the README quotes.

    python benchmarks/train_throughput.py                       # CPU set: tiny seq 128, distilgpt2 seq 256
    python benchmarks/train_throughput.py --gpu                 # GPU set: distilgpt2 seq 1024 bf16
    python benchmarks/train_throughput.py configs/tiny.yaml model.preset=gpt2 ...   # any config

Each run writes one JSON file to benchmarks/results/ naming the device (see flax_gpt/bench/throughput.py for
what is measured and how). Not imported by tests.
"""

from __future__ import annotations

import argparse
import json

from flax_gpt.bench.throughput import run_bench
from flax_gpt.config_files import load_config

SYNTH = ["data.source=synthetic", "data.synthetic_docs=2000", "train.progress=false"]
CPU_SET = [
    ["model.preset=tiny", "model.n_positions=1024", "data.seq_len=128", "train.batch_size=8",
     "data.shards_dir=runs/bench/shards_128"],
    ["model.preset=distilgpt2", "data.seq_len=256", "train.batch_size=4", "data.shards_dir=runs/bench/shards_256"],
]
GPU_SET = [
    ["model.preset=distilgpt2", "model.dtype=bfloat16", "model.pad_vocab_to=128", "model.attn_pdrop=0",
     "data.seq_len=1024", "train.batch_size=16", "data.shards_dir=runs/bench/shards_1024"],
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default="configs/tiny.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--baseline", default="both", choices=("none", "eager", "compile", "both"))
    args = p.parse_args()
    sets = [args.overrides] if args.overrides else (GPU_SET if args.gpu else CPU_SET)
    for overrides in sets:
        cfg = load_config(args.config, SYNTH + overrides + ["train.run_dir=runs/bench/run"])
        r = run_bench(cfg, steps=args.steps, warmup=args.warmup, baseline=args.baseline)
        print(json.dumps({k: r[k] for k in ("device_kind", "tokens_per_sec", "mfu", "compile_time_s", "written_to")}
                         | {"baseline": r["baseline"] and {"tokens_per_sec": r["baseline"]["tokens_per_sec"],
                                                           "ratio": r["baseline"]["ratio"]}}))


if __name__ == "__main__":
    main()
