"""A new learning-rate schedule and a new source format are each one entry in one registry
(`schedules.SCHEDULES`, `readers.FORMATS`): a toy of each, added by patching only that entry, works
through the public path (the config, the optimizer; a source file read and prepared into shards)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from flax_gpt import schedules
from flax_gpt.config import DataConfig
from flax_gpt.config_files import build_config, explain
from flax_gpt.data import readers
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.sources import read_documents
from flax_gpt.data.synthetic import generate_table
from flax_gpt.errors import ConfigError, DataError
from flax_gpt.train.optim import build_optimizer, needs_run_length

# ---------------------------------------------------------------------------- a toy schedule

LR, WARMUP, EVERY = 0.1, 2, 3


def _halving(cfg, total_steps, xp):
    """The peak, halved every EVERY steps after warmup."""
    return lambda s: cfg.learning_rate * xp.power(0.5, xp.floor(s / EVERY))


def expected_lr(step: int) -> float:
    """The toy's learning rate at optimizer step `step`, with the documented linear warmup, in float64."""
    if step < WARMUP:
        return LR * step / WARMUP
    return LR * 0.5 ** math.floor((step - WARMUP) / EVERY)


@pytest.fixture
def toy_schedule(monkeypatch):
    monkeypatch.setitem(schedules.SCHEDULES, "toy", schedules.Schedule(_halving, needs_run_length=True))


def toy_optim(**extra):
    overrides = ["optim.schedule=toy", f"optim.learning_rate={LR}", f"optim.warmup_steps={WARMUP}",
                 "optim.weight_decay=0", "optim.clip_norm=0"] + [f"optim.{k}={v}" for k, v in extra.items()]
    return build_config(overrides=overrides).optim


def test_config_refuses_a_schedule_the_registry_lacks():
    with pytest.raises(ConfigError, match="optim.schedule='toy' is not one of exponential, cosine"):
        toy_optim()


def test_toy_schedule_is_one_registry_entry(toy_schedule):
    cfg = toy_optim()
    assert cfg.schedule == "toy"
    assert needs_run_length(cfg)  # the resume check reads the same entry
    assert "exponential | cosine | linear | constant | wsd | toy" in explain(build_config(overrides=[
        "optim.schedule=toy"]))

    # Adam with a constant gradient of 1 has bias-corrected moments m = v = 1, so each update is
    # -lr(step) / (1 + eps): the optimizer's steps read the schedule back.
    opt = build_optimizer(cfg, total_steps=20)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    grads = {"w": jnp.ones(3)}
    got = []
    for _ in range(12):
        updates, state = opt.update(grads, state, params)
        got.append(-float(updates["w"][0]))
    want = [expected_lr(k) / (1 + cfg.eps) for k in range(12)]
    # Adam's bias correction 1 - b2**k is float32: at k = 2 it is 0.002 with an error up to 6e-8,
    # 3e-5 relative, halved by the square root; the toy's steps differ by factors of 2.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    assert got[WARMUP] > got[WARMUP + EVERY] > got[WARMUP + 2 * EVERY] > 0  # it really is the toy


# ---------------------------------------------------------------------------- a toy source format


def _read_toy(path, batch):
    """`.toy`: one document a line, `title<TAB>abstract`; `batch` lines a Table."""
    lines = [line.split("\t") for line in Path(str(path)).read_text(encoding="utf-8").splitlines() if line]
    for start in range(0, len(lines), batch):
        part = lines[start:start + batch]
        yield readers.Table({"title": [t for t, _ in part], "abstract": [a for _, a in part]}, str(path))


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setitem(readers.FORMATS, ".toy", _read_toy)


@pytest.fixture
def table():
    t = generate_table(40)
    assert not any("\t" in s or "\n" in s for col in t.values() for s in col)
    return t


def write_toy(path: Path, table) -> Path:
    path.write_text("".join(f"{t}\t{a}\n" for t, a in zip(table["title"], table["abstract"])), encoding="utf-8")
    return path


def write_csv(path: Path, table) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["title", "abstract"])
        w.writerows(zip(table["title"], table["abstract"]))
    return path


def test_a_toy_file_is_refused_without_its_entry(tmp_path, table):
    path = write_toy(tmp_path / "docs.toy", table)
    with pytest.raises(DataError, match="unsupported file type .toy"):
        read_documents(DataConfig(source=str(path)))


def test_toy_format_is_one_registry_entry(toy_format, tmp_path, table):
    template = "{title}\n{abstract}"
    want = [f"{t}\n{a}" for t, a in zip(table["title"], table["abstract"])]
    path = write_toy(tmp_path / "docs.toy", table)
    docs = read_documents(DataConfig(source=str(path), template=template, read_batch_docs=7))
    assert docs.texts == want

    # A folder of sources takes the .toy file beside a .csv one; a glob finds it.
    folder = tmp_path / "folder"
    folder.mkdir()
    write_toy(folder / "a.toy", table)
    write_csv(folder / "b.csv", table)
    both = read_documents(DataConfig(source=str(folder), template=template))
    assert both.texts == want + want
    assert read_documents(DataConfig(source=str(tmp_path / "*.toy"), template=template)).texts == want


def test_toy_file_prepares_the_shards_its_csv_twin_does(toy_format, tmp_path, table):
    """Same rows, same file stem: the same unit key, so the same documents on each side and
    byte-identical shards."""

    def prepare(source: Path, name: str) -> dict:
        cfg = DataConfig(source=str(source), template="{title}\n{abstract}", seq_len=32, val_fraction=0.2,
                         shards_dir=str(tmp_path / name))
        return prepare_shards(cfg, log=None)

    (tmp_path / "toy").mkdir()
    (tmp_path / "csv").mkdir()
    toy = prepare(write_toy(tmp_path / "toy" / "docs.toy", table), "shards_toy")
    ref = prepare(write_csv(tmp_path / "csv" / "docs.csv", table), "shards_csv")
    assert toy["stats"]["documents"] == len(table["title"])
    assert toy["splits"]["train"]["rows"] > 0
    sha = {name: [[e["sha256"] for e in s["shards"]] for s in m["splits"].values()]
           for name, m in (("toy", toy), ("csv", ref))}
    assert sha["toy"] == sha["csv"]
    assert toy["fingerprint"] != ref["fingerprint"]  # the source files differ, so the inputs' identity does
    assert json.loads((tmp_path / "shards_toy" / "manifest.json").read_text())["splits"] == toy["splits"]
