"""prepare as a streaming, resumable, shareable job: kill -9 then rerun gives the same bytes, two
processes give the same bytes as one, older shard formats are still read; and the dataset
folders `datasets` users have (a Hub repo snapshot, a save_to_disk folder) give the same shards
as the csv files they were made from."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ARXIV_DIR

from flax_gpt.config import DataConfig
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.shards import open_split
from flax_gpt.data.synthetic import generate_table
from flax_gpt.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["data.template={title}\n{abstract}", "data.seq_len=64", "data.rows_per_shard=16", "data.val_fraction=0.1",
        "data.read_batch_docs=64"]


def quiet(*_):
    pass


def write_corpus(folder: Path, files: int = 4, docs: int = 150) -> list[Path]:
    """Synthetic abstracts in `files` csv files."""
    folder.mkdir(parents=True, exist_ok=True)
    table = generate_table(files * docs)
    paths = []
    for f in range(files):
        path = folder / f"part-{f}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["title", "abstract"])
            w.writerows(zip(table["title"][f * docs:(f + 1) * docs], table["abstract"][f * docs:(f + 1) * docs]))
        paths.append(path)
    return paths


def prepare_cli(cwd: Path, shards: str, *extra, wait=True):
    cmd = [sys.executable, "-m", "flax_gpt.cli", "prepare", str(ROOT / "configs" / "tiny.yaml"), *ARGS,
           "data.source=corpus", f"data.shards_dir={shards}", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {e["file"]: (folder / e["file"]).read_bytes() for s in manifest["splits"].values() for e in s["shards"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A corpus of 4 files and its shards made by one uninterrupted process."""
    root = tmp_path_factory.mktemp("stream")
    write_corpus(root / "corpus")
    r = prepare_cli(root, "one")
    assert r.returncode == 0, r.stderr
    return root


def test_kill_9_during_prepare_then_rerun_gives_the_same_bytes(project):
    parts = project / "killed"
    proc = prepare_cli(project, "killed", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once a unit is done, others are not
        if parts.is_dir() and any(p.name.startswith(".part-") for p in parts.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.communicate()
    assert proc.returncode == -9, "prepare ended before it could be killed"
    assert not (parts / "manifest.json").exists()  # nothing a later run would trust
    r = prepare_cli(project, "killed")
    assert r.returncode == 0, r.stderr
    assert "finished by an earlier run; kept" in r.stdout
    assert shard_bytes(parts) == shard_bytes(project / "one")
    assert json.loads((parts / "manifest.json").read_text()) == \
        json.loads((project / "one" / "manifest.json").read_text())
    assert sorted(p.name for p in parts.iterdir() if not p.name.endswith(".npy")) == [".flax_gpt.json", "manifest.json"]


def test_two_processes_write_the_same_bytes_as_one(project):
    procs = [prepare_cli(project, "two", "--num-processes", "2", "--process-id", str(i), wait=False) for i in (0, 1)]
    for p in procs:
        _out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert shard_bytes(project / "two") == shard_bytes(project / "one")
    assert json.loads((project / "two" / "manifest.json").read_text()) == \
        json.loads((project / "one" / "manifest.json").read_text())


def test_streaming_reads_in_bounded_batches(project, monkeypatch):
    """A batch of documents is the unit of work: a smaller read batch gives the same shards."""
    cfg = DataConfig(source=str(project / "corpus"), template="{title}\n{abstract}", seq_len=64, rows_per_shard=16,
                     val_fraction=0.1, read_batch_docs=7, shards_dir=str(project / "small-batches"))
    prepare_shards(cfg, log=quiet)
    assert shard_bytes(project / "small-batches") == shard_bytes(project / "one")


def test_older_format_shards_are_refused_with_the_fix(project, tmp_path):
    """Shards of format 2 split documents by file and position, so their split moves when a file
    is renamed: prepare and training refuse them in one line naming --overwrite."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(project / "one", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = manifest["settings"]["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(source=str(project / "corpus"), template="{title}\n{abstract}", seq_len=64, rows_per_shard=16,
                     val_fraction=0.1, read_batch_docs=64, shards_dir=str(old))
    with pytest.raises(DataError, match="format_version 2 .*its text.*--overwrite"):
        prepare_shards(cfg, log=None)
    with pytest.raises(DataError, match="format_version 2"):
        open_split(old, "train")
    assert prepare_shards(cfg, overwrite=True, log=None)["format_version"] == 3


def _documents(folder: Path, split: str) -> list[str]:
    """The complete documents of a split, decoded (each ends at an EOS)."""
    from flax_gpt.data.tokenizer import load_tokenizer

    rows = open_split(folder, split)
    text = load_tokenizer("gpt2").decode_bytes(rows.rows(np.arange(rows.num_rows)).reshape(-1)).decode()
    return text.split("<|endoftext|>")[:-1]


def test_the_split_survives_renaming_reformatting_reordering_and_duplicates(tmp_path):
    """The same documents in renamed, reordered parquet files (plus an exact duplicate of each
    of 30 documents, respaced) land on the same sides, and no duplicate straddles the split."""
    pd = pytest.importorskip("pandas")
    table = generate_table(400)
    rows = pd.DataFrame({"title": table["title"], "abstract": table["abstract"]})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rows.to_csv(tmp_path / "a" / "part-0.csv", index=False)
    dupes = rows.iloc[:30].assign(abstract=lambda d: "  " + d["abstract"].str.replace(" ", "   ") + "\n")
    shuffled = pd.concat([rows, dupes]).sample(frac=1.0, random_state=7)
    for i, cut in enumerate(np.array_split(np.arange(len(shuffled)), 3)):
        shuffled.iloc[cut].to_parquet(tmp_path / "b" / f"renamed-{i}.parquet", index=False)
    sides = {}
    for name in ("a", "b"):
        cfg = DataConfig(source=str(tmp_path / name), template="{title}\n{abstract}", seq_len=16, val_fraction=0.2,
                         shards_dir=str(tmp_path / f"shards-{name}"))
        prepare_shards(cfg, log=None)
        sides[name] = {split: set(_documents(cfg.shards_dir, split)) for split in ("train", "val")}
    (train_a, val_a), (train_b, val_b) = ((sides[n]["train"], sides[n]["val"]) for n in "ab")
    assert not (val_a & train_b) and not (train_a & val_b)  # no document changed sides
    # Decoding the rows of all files in a row loses two documents where one file's rows end (its
    # last document cut, glued to the next file's first): at most 2 per file of b and split.
    assert len(val_a) > 40 and len(val_a - val_b) <= 6 and len(train_a - train_b) <= 6
    assert not (val_b & train_b)  # whitespace-respaced duplicates sit on their original's side


# ------------------------------------------------------------------------------ dataset folders


ARXIV_FILES = [ARXIV_DIR / f"arxiv_ml_2025_2026-0{i}.csv" for i in (0, 1)]


@pytest.fixture(scope="module")
def arxiv(tmp_path_factory):
    """The shared abstracts prepared from the csv files, as the reference."""
    if not all(p.is_file() for p in ARXIV_FILES):
        pytest.skip("shared arxiv corpus not present")
    root = tmp_path_factory.mktemp("arxiv")
    ref = {}
    for name, source in (("both", [str(p) for p in ARXIV_FILES]), ("first", str(ARXIV_FILES[0]))):
        cfg = arxiv_cfg(source, root / name)
        prepare_shards(cfg, log=quiet)
        ref[name] = shard_bytes(root / name)
    return root, ref


def arxiv_cfg(source, shards: Path, **kw) -> DataConfig:
    return DataConfig(source=source, template="{title}\n{abstract}", seq_len=128, val_fraction=0.05,
                      rows_per_shard=512, shards_dir=str(shards), **kw)


@pytest.mark.parametrize("layout", ["readme-configs", "data-split-folders"])
def test_hub_repo_snapshot_gives_the_csv_shards(arxiv, tmp_path, layout):
    datasets = pytest.importorskip("datasets")
    _root, ref = arxiv
    repo = tmp_path / "ML-ArXiv-Papers"
    for p in ARXIV_FILES:  # what `huggingface-cli download --repo-type dataset` leaves, file by file
        ds = datasets.Dataset.from_csv(str(p), keep_in_memory=True)
        sub = repo / "data" / ("train" if layout == "data-split-folders" else "")
        sub.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(sub / f"{p.stem}.parquet"))
    if layout == "readme-configs":
        (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: data/*.parquet\n---\n# ML arXiv papers\n")
    assert shard_bytes(_prepared(arxiv_cfg(str(repo), tmp_path / "s"))) == ref["both"]
    # The same folder as datasets reads it: the same rows.
    loaded = datasets.load_dataset(str(repo), split="train")
    assert loaded.num_rows == sum(1 for p in ARXIV_FILES for _ in csv.DictReader(open(p, newline="")))
    with pytest.raises(DataError, match="no .*split 'test'"):
        prepare_shards(arxiv_cfg(str(repo), tmp_path / "t", hf_split="test"), log=quiet)


@pytest.mark.parametrize("kind", ["dataset", "dataset-dict"])
def test_save_to_disk_folder_gives_the_csv_shards(arxiv, tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    _root, ref = arxiv
    ds = datasets.Dataset.from_csv(str(ARXIV_FILES[0]), keep_in_memory=True)
    folder = tmp_path / ARXIV_FILES[0].stem  # the folder's name is the unit's key, as a file's stem
    if kind == "dataset":
        ds.save_to_disk(str(folder))
    else:
        datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(folder))
    shards = _prepared(arxiv_cfg(str(folder), tmp_path / "s"))
    assert shard_bytes(shards) == ref["first"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert "save_to_disk" in manifest["source"]["description"]
    if kind == "dataset-dict":
        with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'validation'"):
            prepare_shards(arxiv_cfg(str(folder), tmp_path / "v", hf_split="validation"), log=quiet)
    # Changing a file of the folder changes the fingerprint: the old shards are not reused.
    arrow = next(folder.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes() + b"\0")
    with pytest.raises(DataError, match="different inputs"):
        prepare_shards(arxiv_cfg(str(folder), shards), log=quiet)


def _prepared(cfg: DataConfig) -> Path:
    prepare_shards(cfg, log=quiet)
    return Path(cfg.shards_dir)


def test_a_hub_stream_that_ends_early_leaves_nothing_trusted(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    class Broken:
        def iter(self, batch_size):
            yield {"abstract": ["a first document of text"] * batch_size}
            raise ConnectionError("connection reset by peer")

    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Broken())
    cfg = DataConfig(source="someone/big-corpus", streaming=True, seq_len=8, shards_dir=str(tmp_path / "s"))
    with pytest.raises(DataError, match="stopped streaming.*nothing was written"):
        prepare_shards(cfg, log=quiet)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not any(p.name.startswith(".part-") for p in (tmp_path / "s").glob(".*")) if (tmp_path / "s").exists() \
        else True


def test_prepare_cli_process_flags_are_checked(tmp_path):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    r = subprocess.run([sys.executable, "-m", "flax_gpt.cli", "prepare", str(ROOT / "configs" / "tiny.yaml"),
                        "--num-processes", "2", "--process-id", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --process-id 2 must be in [0, --num-processes 2)"]
