"""A distilgpt2-shaped model trains on the CPU (the README's quickstart itself runs in test_readme.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_distilgpt2_shaped_model_trains_a_few_steps_on_cpu(tmp_path):
    r = _run("train", ROOT / "configs" / "tiny.yaml", "model.preset=distilgpt2", "data.seq_len=64",
             "train.batch_size=2", "train.steps=2", "train.eval_every=0", "checkpoint.every=0",
             "data.synthetic_docs=60", "train.progress=false", "data.shards_dir=shards",
             f"train.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in records if "loss" in x]
    assert len(losses) == 2 and all(9.0 < loss < 12.0 for loss in losses)  # ~ln(50257) = 10.8 at init
