"""The README's main job, shortened by overrides, end to end from the CLI, and every artifact checked."""

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


def test_quickstart_end_to_end(tmp_path):
    pytest.importorskip("torch")
    r = _run("train", ROOT / "configs" / "quickstart.yaml", "train.steps=6", "train.eval_every=3",
             "checkpoint.every=3", "data.synthetic_docs=300", "train.sample_max_new_tokens=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "quickstart"
    # Three samples, one per prompt, printed at the end.
    for prompt in ("the role of recommender systems", "clustering", "transformers for text generation"):
        assert f"--- sample: {prompt!r}" in r.stdout
    result = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("{")))
    assert result["step"] == 6 and result["export_dir"] == "exports/quickstart"
    export = tmp_path / "exports" / "quickstart"

    # Checkpoints at 3 and 6, metrics with train and eval lines, real TensorBoard event files.
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in records if "loss" in r_] == list(range(1, 7))
    evals = [r_ for r_ in records if "val_loss" in r_]
    assert [e["step"] for e in evals] == [3, 6] and all(e["perplexity"] > 1 for e in evals)
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 200

    # The export loads in transformers with no missing keys and generates through the pipeline.
    from transformers import GPT2LMHeadModel, pipeline

    model, info = GPT2LMHeadModel.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    out = pipeline("text-generation", model=str(export))("clustering", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("clustering")
    card = (export / "README.md").read_text()
    assert "synthetic" in card.lower()

    # eval verb agrees with the last evaluation of training.
    r = _run("eval", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["step"] == 6 and abs(ev["val_loss"] - evals[-1]["val_loss"]) < 1e-5 and ev["tokens"] == evals[-1]["tokens"]

    # Report: valid, non-trivial PNGs.
    r = _run("report", run, "--samples", "2", "--max-new-tokens", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pngs = list((run / "report").glob("*.png"))
    assert len(pngs) >= 8
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png.name
    assert (run / "report" / "index.html").is_file()


@pytest.mark.slow
def test_distilgpt2_shaped_model_trains_a_few_steps_on_cpu(tmp_path):
    r = _run("train", ROOT / "configs" / "tiny.yaml", "model.preset=distilgpt2", "data.seq_len=64",
             "train.batch_size=2", "train.steps=2", "train.eval_every=0", "checkpoint.every=0",
             "data.synthetic_docs=60", "train.progress=false", "data.shards_dir=shards",
             f"train.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in records if "loss" in x]
    assert len(losses) == 2 and all(9.0 < l < 12.0 for l in losses)  # ~ln(50257) = 10.8 at init
