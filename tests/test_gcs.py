"""Every location on gs://, against a real GCS server (gcp-storage-emulator on 127.0.0.1): prepare,
train, kill -9, resume, eval, export, generate and report, with the same losses as the same run on
local disk; and the ways a bucket fails, each one line naming the URL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flax_gpt import storage  # noqa: F401  (first: it passes STORAGE_EMULATOR_HOST on before gcsfs loads)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BUCKET = "gs://flax-gpt-test"
BASE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=4", "model.n_positions=64", "data.seq_len=32",
        "train.batch_size=4", "train.progress=false", "model.embd_pdrop=0", "model.attn_pdrop=0",
        "model.resid_pdrop=0", "data.val_fraction=0.1", "data.template={title}\n{abstract}"]


def cli(*args, cwd: Path, env: dict | None = None, wait: bool = True, timeout: int = 600):
    full = dict(os.environ, JAX_PLATFORMS="cpu", FLAX_GPT_CACHE=str(cwd / "cache"), **(env or {}))
    cmd = [sys.executable, "-m", "flax_gpt.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


GLOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")  # TensorStore's C++ log lines (credentials notice)


def one_line(r, *needles) -> str:
    """One `error:` line; TensorStore's own C++ log line about credentials (which no setting
    silences) is not ours and is left aside."""
    lines = [line for line in r.stderr.splitlines() if line.strip() and not GLOG.match(line)]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-2000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _fs():
    import gcsfs

    return gcsfs.GCSFileSystem(token="anon")


def _losses(text: str) -> dict[int, float]:
    out = {}
    for line in text.splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture
def prefix(gcs):
    return f"{BUCKET}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def corpus(tmp_path, prefix):
    """200 abstract-like rows as a csv file in the bucket (and the same file locally)."""
    from flax_gpt.data.synthetic import generate_table

    t = generate_table(200)
    path = tmp_path / "abstracts.csv"
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["title", "abstract"])
        w.writerows(zip(t["title"], t["abstract"]))
    _fs().put_file(str(path), f"{prefix}/src/abstracts.csv")
    return path


@pytest.mark.slow
def test_prepare_train_kill_resume_eval_export_generate_report_on_gs(tmp_path, prefix, corpus):
    common = [*BASE, "train.steps=8", "train.eval_every=4", "checkpoint.every=2"]
    local = [f"data.source={corpus}", "data.shards_dir=local/shards", "train.run_dir=local/run"]
    assert cli("train", TINY, *common, *local, cwd=tmp_path).returncode == 0
    reference = _losses((tmp_path / "local" / "run" / "metrics.jsonl").read_text())

    remote = [f"data.source={prefix}/src/abstracts.csv", f"data.shards_dir={prefix}/shards",
              f"train.run_dir={prefix}/run", f"train.export_dir={prefix}/export"]
    r = cli("prepare", TINY, *common, *remote, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fs = _fs()
    assert fs.exists(f"{prefix}/shards/manifest.json") and fs.exists(f"{prefix}/shards/.flax_gpt.json")

    proc = cli("train", TINY, *common, *remote, cwd=tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill -9 once checkpoint 2 is committed
        if fs.exists(f"{prefix}/run/checkpoints/2/commit_success.txt"):
            proc.kill()
            break
        time.sleep(0.2)
        fs.invalidate_cache()
    proc.communicate()
    assert proc.returncode == -9, "the run ended before it could be killed"
    r = cli("train", TINY, *common, *remote, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from checkpoint" in r.stdout
    fs.invalidate_cache()
    got = _losses(fs.cat_file(f"{prefix}/run/metrics.jsonl").decode())
    assert sorted(got) == list(range(1, 9)) and all(got[s] == reference[s] for s in reference)  # bitwise
    assert fs.exists(f"{prefix}/export/model.safetensors") and fs.exists(f"{prefix}/run/tb")

    r = cli("eval", f"{prefix}/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    local_ev = json.loads(cli("eval", "local/run", cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert ev["step"] == 8 and ev["val_loss"] == local_ev["val_loss"]

    r = cli("export", f"{prefix}/run", "--out", f"{prefix}/export2", "--step", "6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("generate", "--hf", f"{prefix}/export2", "--prompt", "We study", "--greedy", "--max-new-tokens", "5",
            "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["text"].startswith("We study")

    r = cli("report", f"{prefix}/run", "--samples", "1", "--max-new-tokens", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fs.invalidate_cache()
    assert fs.exists(f"{prefix}/run/report/index.html") and fs.exists(f"{prefix}/run/report/loss.png")


def test_prepare_to_gs_is_byte_identical_to_local(tmp_path, prefix, corpus):
    args = [*BASE, f"data.source={corpus}", "data.rows_per_shard=40"]
    assert cli("prepare", TINY, *args, "data.shards_dir=local", cwd=tmp_path).returncode == 0
    r = cli("prepare", TINY, *args, f"data.shards_dir={prefix}/shards", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fs = _fs()
    manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    files = [e["file"] for s in manifest["splits"].values() for e in s["shards"]]
    assert len(files) > 2
    for name in files:
        assert fs.cat_file(f"{prefix}/shards/{name}") == (tmp_path / "local" / name).read_bytes()
    assert json.loads(fs.cat_file(f"{prefix}/shards/manifest.json")) == manifest


@pytest.mark.parametrize("case", ["unreachable", "no-bucket", "missing-object", "forbidden", "foreign-prefix"])
def test_bucket_failures_are_one_line_naming_the_url(tmp_path, gcs, prefix, case):
    env, args = {}, [*BASE, "data.source=synthetic", "data.synthetic_docs=20"]
    if case == "unreachable":
        env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}  # nothing listens there
        args.append(f"data.shards_dir={prefix}/s")
        needles = ["cannot reach Cloud Storage", prefix]
    elif case == "no-bucket":
        args.append("data.shards_dir=gs://no-such-bucket-here/s")
        needles = ["bucket gs://no-such-bucket-here does not exist"]
    elif case == "missing-object":
        args[-2] = f"data.source={prefix}/nothing.csv"
        args.append("data.shards_dir=local")
        needles = ["path not found", f"{prefix}/nothing.csv"]
    elif case == "forbidden":
        args.append("data.shards_dir=gs://forbidden-bucket/s")
        needles = ["gs://forbidden-bucket/s", "Forbidden"]
    else:
        fs = _fs()
        fs.pipe(f"{prefix}/other/manifest.json", b'{"someone": "else"}')
        args.append(f"data.shards_dir={prefix}/other")
        needles = ["not written by flax-gpt", "manifest.json"]
    t0 = time.time()
    one_line(cli("prepare", TINY, *args, cwd=tmp_path, env=env, timeout=120), *needles)
    assert time.time() - t0 < 60  # seconds, not the libraries' minutes of retries
    assert not (tmp_path / "local").exists()
