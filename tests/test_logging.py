"""What a user watches a run with: TensorBoard reads `RUN_DIR/tb`, Weights & Biases (offline here)
gets the records metrics.jsonl gets, and an installed libtpu stays quiet on a machine without a TPU."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import TRAINED_OVERRIDES
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flax_gpt import cli
from flax_gpt.config_files import build_config
from flax_gpt.train.metrics import WANDB_ID_FILE
from flax_gpt.train.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
LIBTPU = os.environ.get("FLAX_GPT_TEST_LIBTPU", "")
# TensorBoard stores scalars as float32: a float64 metric comes back rounded to within half an ulp.
F32_REL = 2.0**-24


def _expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as TensorBoard tags: train/<key>, or eval/<key> for lines with val_loss."""
    want: dict[str, dict[int, float]] = {}
    for rec in RunDir(run_dir).metrics():
        prefix = "eval" if "val_loss" in rec else "train"
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                want.setdefault(f"{prefix}/{key}", {})[rec["step"]] = float(value)
    return want


def test_tensorboard_reads_the_runs_events_as_metrics_jsonl(trained_run):
    run = trained_run / "run"
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    want = _expected_scalars(run)
    assert {"train/loss", "eval/val_loss"} <= set(want)
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert got[tag] == pytest.approx(by_step, rel=F32_REL, abs=0.0), tag


def test_the_tensorboard_command_the_readme_runs_is_installed():
    import tensorboard

    exe = Path(sys.executable).with_name("tensorboard")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tensorboard.__version__


# ------------------------------------------------------------------------------- W&B (offline)
# An offline run is one `.wandb` file: a 7-byte header, then LevelDB-log records (32 KiB blocks;
# each chunk: CRC-32 of type+data, length, type: full/first/middle/last) holding `Record` protobufs.


def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    buf = path.read_bytes()
    assert buf[:7] == b":W&B\xe1\xbe\x00", "not a W&B run file"
    pos, part, records = 7, b"", []
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if pos + 7 + length > len(buf):  # still being written
            break
        data = buf[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(data, zlib.crc32(bytes([kind]))), "corrupt record"
        pos += 7 + length
        part += data
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


def _offline_runs(wandb_dir: Path, count: int) -> list[dict]:
    """The `count` offline runs under WANDB_DIR, oldest first, each once W&B has written its end (the
    file is completed by W&B's own background process): id, project, name, config, history rows."""
    deadline = time.monotonic() + 120
    while True:
        files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
        records = [_wandb_records(f) for f in files]
        ends = [[r.WhichOneof("record_type") for r in rs][-1:] for rs in records]
        if len(files) == count and all(end == ["exit"] for end in ends):
            break
        assert time.monotonic() < deadline, f"W&B wrote {len(files)} of {count} runs; their last records: {ends}"
        time.sleep(0.05)
    runs = []
    for rs in records:
        run = {"history": [], "config": {}}
        for r in rs:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name)
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                run["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        run["config"].pop("_wandb", None)
        runs.append(run)
    return runs


def _wandb_env(monkeypatch, tmp_path) -> Path:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb_dir


def test_wandb_gets_the_metrics_jsonl_records_and_the_config(trained_run, tmp_path, monkeypatch):
    wandb_dir = _wandb_env(monkeypatch, tmp_path)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "flax_gpt.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *TRAINED_OVERRIDES,
            f"data.shards_dir={trained_run / 'shards'}", f"train.run_dir={run_dir}", "train.steps=3",
            "train.eval_every=2", "train.wandb_project=flax-gpt-test", "train.wandb_run_name=tiny-wb"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    (run,) = _offline_runs(wandb_dir, 1)
    records = RunDir(run_dir).metrics()
    assert [rec["step"] for rec in records if "val_loss" in rec] == [2, 3]  # train and eval lines both
    assert run["history"] == records  # the same records: keys, values and steps
    assert run["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (run["id"], run["project"], run["name"]) == \
        ((run_dir / WANDB_ID_FILE).read_text().strip(), "flax-gpt-test", "tiny-wb")


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    wandb_dir = _wandb_env(monkeypatch, tmp_path)
    run_dir = tmp_path / "run"
    cfg = build_config({}, [f"train.run_dir={run_dir}", "train.wandb_project=p"])
    for first, last in ((1, 2), (3, 4)):  # a run, then its resumption
        with RunDir(run_dir).metrics_writer(enabled=True, config=cfg) as w:
            for step in range(first, last + 1):
                w.write({"step": step, "loss": 1.0 / step})
    a, b = _offline_runs(wandb_dir, 2)
    assert a["id"] == b["id"] == (run_dir / WANDB_ID_FILE).read_text().strip()
    assert a["name"] == b["name"] == "run"  # the run directory's name by default
    assert a["history"] + b["history"] == RunDir(run_dir).metrics()
    other = tmp_path / "other"
    with RunDir(other).metrics_writer(enabled=True, config=cfg.replace(train={"run_dir": str(other)})) as w:
        w.write({"step": 1, "loss": 1.0})
    assert (other / WANDB_ID_FILE).read_text() != (run_dir / WANDB_ID_FILE).read_text()


def test_wandb_without_the_package_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    code = cli.main(["train", str(ROOT / "configs" / "tiny.yaml"), f"data.shards_dir={shards}",
                     f"train.run_dir={run_dir}", "train.wandb_project=p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and 'pip install -e ".[wandb]"' in err[0] and "train.wandb_project" in err[0], err
    assert not shards.exists() and not run_dir.exists()


# ------------------------------------------------------------------------ libtpu without a TPU


@pytest.mark.skipif(not os.path.isfile(LIBTPU), reason="FLAX_GPT_TEST_LIBTPU (a libtpu.so) not set")
def test_an_installed_libtpu_is_quiet_in_flax_gpt_on_a_machine_without_tpu(tmp_path):
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        pytest.skip("a TPU is attached: libtpu has something to say here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS"))}
    env["TPU_LIBRARY_PATH"] = LIBTPU
    devices = "import jax; print(jax.devices()[0].platform)"
    plain = subprocess.run([sys.executable, "-c", devices], env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "TPU_ACCELERATOR_TYPE" in plain.stderr, plain.stderr  # the noise is real
    ours = f"from flax_gpt import cli; assert cli.main(['config']) == 0; {devices}"
    r = subprocess.run([sys.executable, "-c", ours], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == plain.stdout.strip() == "cpu"
    assert r.stderr == ""
