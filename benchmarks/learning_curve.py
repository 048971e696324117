"""Learning check on real text: a small GPT-2 from scratch on the shared ML arXiv abstracts.

    python benchmarks/learning_curve.py [--steps 300] [--corpus ../shared/data/arxiv]

Trains with the normal CLI (`flax-gpt train`), evaluating on the held-out split every `--eval-every`
steps, and writes the validation curve to benchmarks/results/learning_curve_arxiv.json (naming the
machine). Not imported by tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", default="../shared/data/arxiv")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results/learning_curve_arxiv.json")
    args = p.parse_args()
    files = sorted(str(f) for f in Path(args.corpus).glob("arxiv_ml_2025_2026-0*.csv"))
    if not files:
        sys.exit(f"no corpus files in {args.corpus}")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"data.source={json.dumps(files)}", 'data.template="{title}\\n{abstract}"', "data.seq_len=64",
            "data.val_fraction=0.02", f"data.shards_dir={tmp}/shards", f"train.run_dir={tmp}/run",
            "model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.n_positions=128",
            "train.batch_size=16", f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
            "optim.learning_rate=3e-3", "optim.warmup_steps=20", "optim.decay_steps=100", "optim.decay_rate=0.8",
            "checkpoint.every=0", "train.progress=false",
        ]
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "flax_gpt.cli", "train", "configs/tiny.yaml", *overrides], check=True)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        manifest = json.loads((Path(tmp) / "shards" / "manifest.json").read_text())
    evals = [{"step": r["step"], "val_loss": r["val_loss"], "perplexity": r["perplexity"]}
             for r in records if "val_loss" in r]
    result = {
        "benchmark": "learning_curve_arxiv",
        "machine": {"platform": platform.platform(), "device_kind": jax.devices()[0].device_kind,
                    "jax": jax.__version__},
        "corpus": {"files": [Path(f).name for f in files], "train_tokens": manifest["splits"]["train"]["tokens"],
                   "val_tokens": manifest["splits"]["val"]["tokens"]},
        "model": "GPT-2, 2 layers, 128 wide, 4 heads, from scratch; seq 64, batch 16",
        "wall_s": time.time() - t0,
        "eval": evals,
        "train_loss_first_last": [next(r["loss"] for r in records if "loss" in r),
                                  [r["loss"] for r in records if "loss" in r][-1]],
        "monotone_val_loss": all(a["val_loss"] > b["val_loss"] for a, b in itertools.pairwise(evals)),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(evals))


if __name__ == "__main__":
    main()
