"""prepare_shards: round trips, independent token counts, splits, reuse/overwrite, stats."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flax_gpt.config import DataConfig
from flax_gpt.data.prepare import prepare_shards, split_documents
from flax_gpt.data.shards import open_split
from flax_gpt.data.stats import describe_stats
from flax_gpt.data.synthetic import generate_table
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import DataError

ARXIV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arxiv"
SAMPLE = ARXIV / "arxiv_ml_sample500.csv"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    """Independent reference: the `tokenizers` GPT-2 tokenizer (transformers' backend, without
    importing transformers/torch) built from the saved tokenizer.json. Called like an HF tokenizer."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(tok.save_hf(tmp_path_factory.mktemp("tok")) / "tokenizer.json"))
    ref.encode_special_tokens = True  # "<|endoftext|>" in text is text, as in our pipeline

    def call(text, **_):
        return {"input_ids": ref.encode(text, add_special_tokens=False).ids}

    return call


def norm(s: str) -> str:
    return " ".join(s.split())


def quiet(*_):
    pass


def hf_count(hf, text: str) -> int:
    return len(hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def split_rows(shards_dir, split):
    rows = open_split(shards_dir, split)
    return rows, rows.rows(np.arange(rows.num_rows))


def check_round_trip(cfg, manifest, docs, tok, hf):
    """decode(rows of each split, in order) == split docs joined by EOS, minus the dropped tail."""
    is_val = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    for name, members in (("train", ~is_val), ("val", is_val)):
        split_docs = [d for d, m in zip(docs, members) if m]
        rows, arr = split_rows(cfg.shards_dir, name)
        info = manifest["splits"][name]
        # Independent tokenization (transformers, not our tiktoken path).
        expected = [i for d in split_docs for i in hf(d, add_special_tokens=False,
                                                       split_special_tokens=True)["input_ids"] + [tok.eos_id]]
        dropped = info["dropped_tokens"]
        assert 0 <= dropped < cfg.seq_len
        assert arr.size + dropped == len(expected)
        assert arr.reshape(-1).tolist() == expected[:arr.size]
        full_text = (EOT.join(split_docs) + EOT).encode()
        assert tok.decode_bytes(arr.reshape(-1)) + tok.decode_bytes(expected[arr.size:]) == full_text
        assert info["documents"] == len(split_docs) and info["tokens"] == arr.size
        assert info["rows"] == rows.num_rows == arr.shape[0]


def synthetic_cfg(tmp_path, **kw) -> DataConfig:
    base = dict(source="synthetic", synthetic_docs=120, seq_len=64, val_fraction=0.1, split_seed=1,
                shards_dir=str(tmp_path / "shards"), rows_per_shard=50)
    base.update(kw)
    return DataConfig(**base)


def test_synthetic_round_trip_and_counts(tmp_path, tok, hf):
    cfg = synthetic_cfg(tmp_path)
    manifest = prepare_shards(cfg, log=quiet)
    docs = [norm(t) for t in generate_table(120)["abstract"]]
    check_round_trip(cfg, manifest, docs, tok, hf)
    assert manifest["source"]["synthetic"] is True and "synthetic" in manifest["source"]["description"]
    assert len(manifest["splits"]["train"]["shards"]) > 1  # exercises the multi-shard gather
    stats = manifest["stats"]
    counts = [hf_count(hf, d) for d in docs]
    assert stats["documents"] == len(docs)
    assert stats["tokens"]["max"] == max(counts) and stats["tokens"]["min"] == min(counts)
    assert stats["tokens"]["mean"] == pytest.approx(np.mean(counts), abs=1e-3)
    assert stats["words"]["median"] == np.median([len(d.split()) for d in docs])
    assert sum(stats["tokens"]["histogram"]["counts"]) == len(docs)
    words = [len(d.split()) for d in docs]
    assert 90 <= np.mean(words) <= 260  # abstract-like lengths
    for key, values in (("words", words), ("tokens", counts)):
        top = max(Counter(values).values())
        assert stats[key]["mode"] == min(v for v, c in Counter(values).items() if c == top)
        assert stats[key]["max"] == max(values)


def test_arxiv_sample_round_trip_with_template(tmp_path, tok, hf):
    if not SAMPLE.is_file():
        pytest.skip("shared arxiv corpus not present")
    cfg = DataConfig(source=str(SAMPLE), template="{title}\n{abstract}", seq_len=128, val_fraction=0.05,
                     shards_dir=str(tmp_path / "arxiv"), rows_per_shard=256)
    manifest = prepare_shards(cfg, log=quiet)
    with open(SAMPLE, newline="", encoding="utf-8") as f:
        docs = [norm(r["title"]) + "\n" + norm(r["abstract"]) for r in csv.DictReader(f)]
    check_round_trip(cfg, manifest, docs, tok, hf)
    p = manifest["stats"]["pad_truncate_300"]
    counts = np.array([hf_count(hf, d) for d in docs])
    assert p["truncated_documents_fraction"] == pytest.approx((counts > 300).mean(), abs=1e-6)
    assert p["padding_fraction"] == pytest.approx(np.maximum(0, 300 - counts).sum() / (300 * len(counts)), abs=1e-6)
    text = describe_stats(manifest)
    assert "pad/truncate to 300" in text and f"{len(docs):,} kept" in text


def test_splits_are_disjoint_and_cover_the_corpus(tmp_path, tok):
    cfg = synthetic_cfg(tmp_path, val_fraction=0.25, seq_len=32)
    manifest = prepare_shards(cfg, log=quiet)
    docs = [norm(t) for t in generate_table(120)["abstract"]]
    pieces = {}
    for name in ("train", "val"):
        _, arr = split_rows(cfg.shards_dir, name)
        text = tok.decode_bytes(arr.reshape(-1)).decode("utf-8", "replace")
        pieces[name] = text.split(EOT)[:-1]  # complete documents (the last piece is the cut tail)
    train, val = set(pieces["train"]), set(pieces["val"])
    assert train and val and not (train & val)
    assert train | val <= set(docs)
    assert 15 <= manifest["splits"]["val"]["documents"] <= 45  # about 25% of 120 (binomial, 3 sigma)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 120
    # Another seed gives another split of the same documents; a document's side is a function of
    # (seed, its normalised text) alone: the same in any order, any neighbours, any spacing.
    many = [f"document {i} about topic {i % 17}" for i in range(10_000)]
    whole = split_documents(many, 0.25, 1)
    assert not np.array_equal(whole, split_documents(many, 0.25, 2))
    assert np.array_equal(whole[300:400], split_documents(many[300:400], 0.25, 1))
    assert np.array_equal(whole[::-1], split_documents(many[::-1], 0.25, 1))
    spaced = ["  " + t.replace(" ", " \n\t ") + " " for t in many[:500]]
    assert np.array_equal(whole[:500], split_documents(spaced, 0.25, 1))
    assert abs(whole.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(many))  # binomial, 4 sigma


def test_pad_mode_rows(tmp_path, tok, hf):
    cfg = synthetic_cfg(tmp_path, packing="pad", seq_len=160, synthetic_docs=40)
    manifest = prepare_shards(cfg, log=quiet)
    docs = [norm(t) for t in generate_table(40)["abstract"]]
    is_val = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    _, arr = split_rows(cfg.shards_dir, "train")
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    assert arr.shape == (len(train_docs), 160)
    cut = 0
    for row, doc in zip(arr, train_docs):
        ids = hf(doc, add_special_tokens=False)["input_ids"] + [tok.eos_id]
        keep = min(len(ids), 160)
        assert row[:keep].tolist() == ids[:keep]
        assert (row[keep:] == tok.eos_id).all()
        cut += len(ids) - keep
    assert manifest["splits"]["train"]["dropped_tokens"] == cut > 0


def test_reuse_and_overwrite(tmp_path):
    cfg = synthetic_cfg(tmp_path, synthetic_docs=60)
    first = prepare_shards(cfg, log=quiet)
    shards = Path(cfg.shards_dir)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.iterdir()}
    logs = []
    again = prepare_shards(cfg, log=logs.append)
    assert again == first and any("reusing" in m for m in logs)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.iterdir()} == before

    changed = synthetic_cfg(tmp_path, synthetic_docs=60, seq_len=128)  # fewer shards: stale ones
    with pytest.raises(DataError, match=r"different inputs.*data.seq_len 64 -> 128.*--overwrite"):
        prepare_shards(changed, log=quiet)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.iterdir()} == before

    new = prepare_shards(changed, overwrite=True, log=quiet)
    assert new["seq_len"] == 128 and new["fingerprint"] != first["fingerprint"]
    listed = {e["file"] for s in new["splits"].values() for e in s["shards"]} | {"manifest.json", ".flax_gpt.json"}
    assert {p.name for p in shards.iterdir()} == listed  # stale shards removed, no tmp files
    assert open_split(shards, "train", seq_len=128).num_rows == new["splits"]["train"]["rows"]


def test_damaged_shards_with_same_inputs_are_rebuilt(tmp_path):
    cfg = synthetic_cfg(tmp_path, synthetic_docs=60)
    manifest = prepare_shards(cfg, log=quiet)
    path = Path(cfg.shards_dir) / manifest["splits"]["train"]["shards"][0]["file"]
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    logs = []
    prepare_shards(cfg, log=logs.append)
    assert any("damaged" in m for m in logs) and path.read_bytes() == good


def test_changed_source_file_is_detected(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"abstract": "one two three"}) + "\n" + json.dumps({"abstract": "four"}) + "\n")
    cfg = DataConfig(source=str(src), seq_len=4, val_fraction=0.0, shards_dir=str(tmp_path / "s"))
    prepare_shards(cfg, log=quiet)
    src.write_text(json.dumps({"abstract": "completely different text here"}) + "\n")
    with pytest.raises(DataError, match=r"data.source \(files"):
        prepare_shards(cfg, log=quiet)


def test_manifest_schema(tmp_path):
    cfg = synthetic_cfg(tmp_path, synthetic_docs=50)
    m = prepare_shards(cfg, log=quiet)
    assert m["format_version"] == 3 and m["settings"]["split_rule"].startswith("validation when")
    assert set(m["tokenizer"]) == {"name", "vocab_size", "eos_id", "fingerprint"}
    assert (m["tokenizer"]["vocab_size"], m["dtype"], m["seq_len"], m["packing"]) == (50257, "uint16", 64, "pack")
    assert {"description", "fingerprint", "synthetic"} <= set(m["source"])
    for split in ("train", "val"):
        s = m["splits"][split]
        assert {"rows", "tokens", "documents", "dropped_tokens", "shards"} <= set(s)
        assert sum(e["rows"] for e in s["shards"]) == s["rows"]
        for e in s["shards"]:
            data = (Path(cfg.shards_dir) / e["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"]
    st = m["stats"]
    for key in ("words", "tokens"):
        assert {"mean", "median", "mode", "min", "max", "histogram"} <= set(st[key])
        h = st[key]["histogram"]
        assert len(h["bin_edges"]) == len(h["counts"]) + 1
    assert {"padding_fraction", "truncated_documents_fraction", "truncated_tokens_fraction"} <= set(
        st["pad_truncate_300"])
    on_disk = json.loads((Path(cfg.shards_dir) / "manifest.json").read_text())
    assert on_disk == m


def test_val_fraction_zero_gives_empty_val(tmp_path):
    cfg = synthetic_cfg(tmp_path, synthetic_docs=20, val_fraction=0.0)
    m = prepare_shards(cfg, log=quiet)
    assert m["splits"]["val"]["rows"] == 0 and m["splits"]["train"]["documents"] == 20
    assert open_split(cfg.shards_dir, "val").num_rows == 0
