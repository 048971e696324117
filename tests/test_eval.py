"""`flax-gpt eval` on any corpus and on any HF GPT-2 folder: a run and its export score the same
text the same, every document is packed as prepare packs it, and misuse is one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flax_gpt.data.synthetic import generate_table
from flax_gpt.data.tokenizer import load_tokenizer


def cli(*args, cwd: Path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> Path:
    """Text the run never saw: titles and abstracts of later synthetic documents, as csv."""
    path = tmp_path_factory.mktemp("held_out") / "held_out.csv"
    table = generate_table(200)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["title", "abstract"])
        w.writerows(zip(table["title"][150:], table["abstract"][150:]))
    return path


def test_eval_of_the_run_names_its_data(trained_run):
    r = cli("eval", "run", "--step", "best", cwd=trained_run)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"step", "val_loss", "perplexity", "tokens", "seq_len", "data"} and out["step"] == 4
    assert out["seq_len"] == 32  # the run's data.seq_len
    assert "validation split" in out["data"] and out["tokens"] > 0


def test_a_run_and_its_export_score_any_corpus_the_same(trained_run, other_corpus):
    args = ["--data", other_corpus, "--template", "{title}\n{abstract}", "--seq-len", "32"]
    r1 = cli("eval", "run", *args, cwd=trained_run)
    r2 = cli("eval", "--hf", "export", *args, cwd=trained_run)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    run, hf = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (r1, r2))
    assert hf["step"] is None and run["step"] == 4
    assert abs(run["val_loss"] - hf["val_loss"]) < 1e-5 and run["tokens"] == hf["tokens"]
    assert str(other_corpus) in run["data"]
    # Every document, each followed by EOS, packed into rows of 32 with only the final partial row
    # dropped; the loss counts every position but each row's last.
    tok = load_tokenizer("gpt2")
    with open(other_corpus, newline="") as f:
        docs = [" ".join(r["title"].split()) + "\n" + " ".join(r["abstract"].split()) for r in csv.DictReader(f)]
    total = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    rows = total // 32
    assert run["tokens"] == rows * 31


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--hf", "export"], "pass --data SOURCE"),
    (["eval", "--hf", "export", "--data", "x.csv", "--seq-len", "128"], "exceeds the model's context"),
    (["eval", "run", "--hf", "export"], "not allowed with argument"),
    (["eval", "--hf", "export", "--step", "2", "--data", "x.csv"], "does not apply to --hf"),
])
def test_eval_misuse_is_one_line(trained_run, argv, needle):
    r = cli(*argv, cwd=trained_run)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_a_shards_folder_is_scored_as_prepared_and_names_its_length(trained_run):
    """Before/after on the run's own rows: `--hf MODEL --data SHARDS` scores the shards' validation
    split, the same rows `eval RUN` scores, at the length they were prepared with."""
    r1 = cli("eval", "run", cwd=trained_run)
    r2 = cli("eval", "--hf", "export", "--data", "shards", cwd=trained_run)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    run, hf = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (r1, r2))
    assert run["seq_len"] == hf["seq_len"] == 32 and run["tokens"] == hf["tokens"]
    assert abs(run["val_loss"] - hf["val_loss"]) < 1e-5 and "validation split of shards" in hf["data"]
    assert "eval (" in r2.stderr  # the progress bar counts batches on stderr; stdout is one JSON object


def test_exported_files_are_readable_like_any_other(trained_run):
    umask = os.umask(0)
    os.umask(umask)
    for f in (trained_run / "export").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
