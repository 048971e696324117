"""Sources: local formats read the same documents; bad inputs give one-line DataErrors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from flax_gpt.config import DataConfig
from flax_gpt.data import sources
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.sources import read_documents, resolve_source
from flax_gpt.errors import DataError

ROWS = [
    {"title": "First paper", "abstract": "We  study\n  things.\tA lot.", "year": 2024},
    {"title": "Second", "abstract": "Another   abstract here.", "year": 2025},
    {"title": "Empty one", "abstract": "   ", "year": 2025},
    {"title": "Third", "abstract": "Ünïcödé text 🤖 and more.", "year": 2026},
]
EXPECTED = ["We study things. A lot.", "Another abstract here.", "Ünïcödé text 🤖 and more."]


def quiet(*_):
    pass


def write_csv(path: Path, rows=ROWS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_all_formats(d: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    out = {"csv": write_csv(d / "a.csv")}
    out["jsonl"] = d / "a.jsonl"
    out["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    out["json"] = d / "a.json"
    out["json"].write_text(json.dumps(ROWS), encoding="utf-8")
    out["parquet"] = d / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"])
    out["txt"] = d / "a.txt"
    out["txt"].write_text("\n\n".join(r["abstract"] for r in ROWS) + "\n", encoding="utf-8")
    return out


def cfg_for(source, tmp_path=None, **kw) -> DataConfig:
    return DataConfig(source=source, shards_dir=str((tmp_path or Path("/nonexistent")) / "shards"), **kw)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet", "txt"])
def test_every_local_format_reads_the_same_documents(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    docs = read_documents(cfg_for(str(path)))
    assert docs.texts == EXPECTED
    # In .txt a whitespace-only paragraph is part of the blank-line separator, not a document.
    assert docs.empty_dropped == (0 if fmt == "txt" else 1) and docs.invalid_utf8_replaced == 0
    assert docs.synthetic is False and str(path) in docs.description


def test_json_column_layout_and_template(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"title": [r["title"] for r in ROWS], "abstract": [r["abstract"] for r in ROWS],
                                "year": [r["year"] for r in ROWS]}))
    docs = read_documents(cfg_for(str(path), template="{title} ({year})\n{abstract}"))
    assert docs.texts[0] == "First paper (2024)\nWe study things. A lot."
    assert docs.texts[2] == "Empty one (2025)\n"  # the template adds text, so the row is kept
    raw = read_documents(cfg_for(str(path), normalize_whitespace=False))
    assert raw.texts[0] == ROWS[0]["abstract"]


def test_glob_list_and_folder_sources(tmp_path):
    paths = write_all_formats(tmp_path / "d")
    kind, found = resolve_source(str(tmp_path / "d" / "*.json*"))
    assert kind == "files" and [p.name for p in found] == ["a.json", "a.jsonl"]
    docs = read_documents(cfg_for([str(paths["csv"]), str(tmp_path / "d" / "*.parquet")]))
    assert docs.texts == EXPECTED * 2
    kind, found = resolve_source(str(tmp_path / "d"))
    assert len(found) == 5


def test_source_resolution_rules(tmp_path, monkeypatch):
    assert resolve_source("synthetic") == ("synthetic", "synthetic")
    assert resolve_source("CShorten/ML-ArXiv-Papers") == ("hub", "CShorten/ML-ArXiv-Papers")
    with pytest.raises(DataError, match=r"path not found: data/missing\.csv.*fix the path"):
        resolve_source("data/missing.csv")
    with pytest.raises(DataError, match="matches no files"):
        resolve_source(str(tmp_path / "*.csv"))
    bad = tmp_path / "x.xml"
    bad.write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type .xml"):
        resolve_source(str(bad))


def test_hub_offline_is_a_clear_error(tmp_path, monkeypatch):

    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: False)
    cfg = cfg_for("someone/some-dataset", tmp_path)
    with pytest.raises(DataError, match="Hub is unreachable.*point data.source at local files"):
        prepare_shards(cfg, log=quiet)
    assert not (tmp_path / "shards").exists()


def test_missing_path_error_through_prepare(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        prepare_shards(cfg_for(str(tmp_path / "nope.csv"), tmp_path), log=quiet)
    assert "\n" not in str(e.value)


def test_unknown_column_names_the_existing_ones(tmp_path):
    path = write_csv(tmp_path / "a.csv")
    with pytest.raises(DataError, match=r"'summary'.*columns are \['title', 'abstract', 'year'\]"):
        read_documents(cfg_for(str(path), text_column="summary"))
    with pytest.raises(DataError, match=r"\['authors'\].*columns are \['title', 'abstract', 'year'\]"):
        read_documents(cfg_for(str(path), template="{title} by {authors}"))
    with pytest.raises(DataError, match="positional field"):
        read_documents(cfg_for(str(path), template="{} {title}"))


def test_empty_corpus(tmp_path):
    path = write_csv(tmp_path / "a.csv", [{"title": "t", "abstract": "  \n "}, {"title": "u", "abstract": ""}])
    with pytest.raises(DataError, match=r"no non-empty documents.*2 rows read"):
        prepare_shards(cfg_for(str(path), tmp_path), log=quiet)
    header_only = tmp_path / "h.csv"
    header_only.write_text("title,abstract\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        read_documents(cfg_for(str(header_only)))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"title,abstract\nA,good text\nB,bad \xff\xfe bytes and \xc3 more\n")
    docs = read_documents(cfg_for(str(path)))
    assert docs.invalid_utf8_replaced == 3
    assert docs.texts == ["good text", "bad \ufffd\ufffd bytes and \ufffd more"]
    m = prepare_shards(cfg_for(str(path), tmp_path, seq_len=4, val_fraction=0.0), log=quiet)
    assert m["stats"]["invalid_utf8_replaced"] == 3
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"ok line\n\nbroken \x80 line\n")
    docs = read_documents(cfg_for(str(txt)))
    assert docs.texts == ["ok line", "broken \ufffd line"] and docs.invalid_utf8_replaced == 1


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"abstract": "fine"}\n{"abstract": broken}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        read_documents(cfg_for(str(path)))


def test_synthetic_source_is_deterministic_and_labelled():
    a = read_documents(DataConfig(synthetic_docs=30))
    b = read_documents(DataConfig(synthetic_docs=30))
    c = read_documents(DataConfig(synthetic_docs=31))
    assert a.texts == b.texts and c.texts[:30] == a.texts and len(c.texts) == 31
    assert a.synthetic and "synthetic" in a.description
    assert a.fingerprint == b.fingerprint != c.fingerprint
    titled = read_documents(DataConfig(synthetic_docs=3, template="{title}\n{abstract}"))
    assert [t.split("\n", 1)[1] for t in titled.texts] == a.texts[:3]
    vocab = {w for t in read_documents(DataConfig(synthetic_docs=300)).texts for w in t.split()}
    assert len(vocab) > 1000
    assert np.median([len(t.split()) for t in a.texts]) > 100


def test_data_path_never_imports_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from flax_gpt.data.prepare import prepare_shards; "
            "from flax_gpt.data.loader import TrainLoader; import flax_gpt.data.prepare, flax_gpt.data.loader; "
            "print(sorted(m for m in ('jax', 'transformers', 'datasets', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stderr
    assert ".csv" in sources.FORMATS  # module imported in-process too


def test_hub_code_path_calls_load_dataset_with_config(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_dict({"title": ["t1", "t2"], "abstract": ["Hub doc one.", "Hub  doc two."]})

    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = read_documents(cfg_for("CShorten/ML-ArXiv-Papers", hf_split="train[:2]", hf_revision="abc123"))
    assert calls == [("CShorten/ML-ArXiv-Papers", None, "train[:2]", "abc123")]
    assert docs.texts == ["Hub doc one.", "Hub doc two."]
    assert "CShorten/ML-ArXiv-Papers" in docs.description and "abc123" in docs.description
