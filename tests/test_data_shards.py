"""open_split's checks: every way a shard folder can be wrong is a one-line DataError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flax_gpt.config import DataConfig
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.shards import open_split
from flax_gpt.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    cfg = DataConfig(source="synthetic", synthetic_docs=80, seq_len=64, rows_per_shard=40,
                     val_fraction=0.1, shards_dir=str(root / "s"))
    return cfg, prepare_shards(cfg, log=lambda *_: None)


@pytest.fixture
def shards(prepared, tmp_path):
    """A private copy of the prepared folder, free to damage."""
    cfg, manifest = prepared
    dst = tmp_path / "copy"
    dst.mkdir()
    for p in Path(cfg.shards_dir).iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst, manifest


def test_open_split_reads_the_rows(shards):
    d, m = shards
    rows = open_split(d, "train", vocab_size=50257, seq_len=64, verify=True)
    assert rows.num_rows == m["splits"]["train"]["rows"] and rows.seq_len == 64 and rows.eos_id == 50256
    files = [np.load(d / e["file"]) for e in m["splits"]["train"]["shards"]]
    full = np.concatenate(files).astype(np.int32)
    idx = np.array([0, rows.num_rows - 1, 39, 40, 41, 5, 5])  # crosses the shard boundary, repeats
    got = rows.rows(idx)
    assert got.dtype == np.int32 and got.shape == (7, 64)
    np.testing.assert_array_equal(got, full[idx])
    with pytest.raises(IndexError):
        rows.rows(np.array([rows.num_rows]))


def test_truncated_shard(shards):
    d, m = shards
    victim = d / m["splits"]["train"]["shards"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-128])
    with pytest.raises(DataError, match=rf"{victim.name} is truncated.*--overwrite"):
        open_split(d, "train")
    open_split(d, "val")  # other splits still open


def test_missing_shard(shards):
    d, m = shards
    (d / m["splits"]["val"]["shards"][0]["file"]).unlink()
    with pytest.raises(DataError, match=r"val-00000-00000\.npy is missing"):
        open_split(d, "val")


def test_verify_catches_same_size_corruption(shards):
    d, m = shards
    victim = d / m["splits"]["train"]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    open_split(d, "train")  # sizes still match: only --verify can tell
    with pytest.raises(DataError, match="sha256"):
        open_split(d, "train", verify=True)


def test_vocab_and_seq_len_mismatch(shards):
    d, _ = shards
    with pytest.raises(DataError, match=r"vocab_size 50257.*model's vocab_size is 1000.*>= 50257"):
        open_split(d, "train", vocab_size=1000)
    open_split(d, "train", vocab_size=50304)  # a padded model vocab is fine
    with pytest.raises(DataError, match=r"seq_len 64 but data.seq_len is 128.*--overwrite"):
        open_split(d, "train", seq_len=128)


def test_manifest_problems(shards, tmp_path):
    d, _ = shards
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99.*reads versions \\(3,\\)"):
        open_split(d, "train")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        open_split(d, "train")
    with pytest.raises(DataError, match="no manifest.json.*flax-gpt prepare"):
        open_split(tmp_path / "nowhere", "train")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="split 'test' not in"):
        open_split(d, "test")


def test_unreadable_manifest_blocks_prepare_without_overwrite(prepared, shards):
    cfg, _ = prepared
    d, _ = shards
    (d / "manifest.json").write_text("{broken")
    before = sorted((p.name, p.read_bytes()) for p in d.iterdir())
    import dataclasses

    cfg2 = dataclasses.replace(cfg, shards_dir=str(d))
    with pytest.raises(DataError, match="unreadable"):
        prepare_shards(cfg2, log=lambda *_: None)
    assert sorted((p.name, p.read_bytes()) for p in d.iterdir()) == before
    m = prepare_shards(cfg2, overwrite=True, log=lambda *_: None)
    assert open_split(d, "train", verify=True).num_rows == m["splits"]["train"]["rows"]
