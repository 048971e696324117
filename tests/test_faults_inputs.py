"""Damaged and unusual inputs, and command-line values that could only be mistakes: each ends in
one line `error: ...` naming the problem and the fix (exit 2), and the files around stay as they
were. Most cases run the CLI in-process (`main` returns the exit status); a FIFO, which would
block a process forever, runs in a subprocess with a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_faults import one_line, unchanged

from flax_gpt import storage
from flax_gpt.cli import main
from flax_gpt.config import DataConfig
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.shards import open_split, shard_bytes
from flax_gpt.data.sources import resolve_source
from flax_gpt.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.seq_len=32", "data.rows_per_shard=16", "data.synthetic_docs=120"]


def run(capsys, *argv) -> SimpleNamespace:
    """`flax-gpt ARGV` in this process, as `one_line` reads a finished subprocess."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Shards of the small synthetic corpus (several shards per split), prepared once."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = DataConfig(source="synthetic", synthetic_docs=120, seq_len=32, rows_per_shard=16, val_fraction=0.1,
                     shards_dir=str(root / "shards"))
    prepare_shards(cfg, log=None)
    return root / "shards"


@pytest.fixture
def shards(prepared, tmp_path) -> Path:
    """A private copy of the prepared shards, free to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "shards"))


# ------------------------------------------------------------------ dataset folders' README configs


def _dataset_folder(tmp_path: Path, front_matter: str) -> Path:
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.csv").write_text("abstract\none document\n")
    (repo / "README.md").write_text(f"---\n{front_matter}---\n# a dataset\n")
    return repo


@pytest.mark.parametrize("front_matter,needle", [
    ("configs: default\n", "`configs:` is a string, not a list"),
    ("configs: 3\n", "`configs:` is an integer, not a list"),
    ("configs:\n- 3\n", "entry 1 is an integer"),
    ("configs:\n- data_files: data/*.csv\n", "entry 1 has no config_name"),
    ("configs:\n- config_name: default\n  data_files: []\n", "entry 1 ('default') has data_files '[]'"),
    ("configs:\n- config_name: default\n  data_files:\n  - split: train\n", "has data_files"),
    ("configs:\n- config_name: default\n  data_files: 7\n", "has data_files '7'"),
    ("configs: [unclosed\n", "front matter is not valid YAML"),
], ids=["string", "integer", "integer-entry", "no-config-name", "empty-data-files", "split-without-path",
        "integer-data-files", "broken-yaml"])
def test_a_malformed_readme_configs_block_is_one_line(tmp_path, capsys, front_matter, needle):
    repo = _dataset_folder(tmp_path, front_matter)
    with unchanged(tmp_path):
        r = run(capsys, "prepare", TINY, *SMALL, f"data.source={repo}", f"data.shards_dir={tmp_path / 'out'}")
    line = one_line(r, needle, "README.md")
    assert "point data.source at the data files" in line or "fix it" in line


def test_a_config_without_data_files_reads_the_folder_as_datasets_does(tmp_path):
    # `datasets` takes such an entry's files from its data_dir (or the folder) by their names.
    repo = _dataset_folder(tmp_path, "configs:\n- config_name: default\n  data_dir: data\n")
    (repo / "data" / "test.csv").write_text("abstract\nheld out\n")
    assert resolve_source(str(repo)) == ("files", [repo / "data" / "train.csv"])


# ------------------------------------------------------------------ manifests and token ids


@pytest.mark.parametrize("damage,needle", [
    (lambda m: m.pop("splits"), "no splits"),
    (lambda m: m.pop("tokenizer"), "no tokenizer"),
    (lambda m: m["tokenizer"].pop("vocab_size"), "no tokenizer"),
    (lambda m: m["splits"]["train"].pop("shards"), "split 'train' has no list of shards"),
    (lambda m: m.update(dtype="int16"), "dtype 'int16' is not uint16 or uint32"),
    (lambda m: m.update(seq_len="32"), "seq_len '32' is not a positive integer"),
], ids=["no-splits", "no-tokenizer", "no-vocab-size", "no-shard-list", "signed-dtype", "seq-len-text"])
def test_a_manifest_missing_what_readers_need_is_one_line(shards, tmp_path, capsys, damage, needle):
    manifest = json.loads((shards / "manifest.json").read_text())
    damage(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with unchanged(tmp_path):
        r = run(capsys, "prepare", TINY, *SMALL, f"data.shards_dir={shards}")
    one_line(r, "manifest.json is damaged", needle, "--overwrite")
    with pytest.raises(DataError, match=needle):
        open_split(shards, "train")


def test_signed_shards_with_negative_ids_are_refused(shards):
    """A manifest declaring signed token ids is refused before a negative id can index the
    embedding table from its end."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        rows = np.load(shards / entry["file"]).astype(np.int16)
        rows[0, 0] = -1
        data = shard_bytes(rows)
        (shards / entry["file"]).write_bytes(data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["dtype"] = "int16"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="dtype 'int16' is not uint16 or uint32.*--overwrite"):
        open_split(shards, "train", vocab_size=50257, seq_len=32)


def test_ids_that_turn_negative_as_int32_are_refused_like_out_of_vocab_ones(shards):
    """uint32 shards hold ids up to 2**32 - 1; read as int32 an id >= 2**31 is negative, and the
    range check refuses it as it refuses one >= the vocabulary."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entries = manifest["splits"]["train"]["shards"]
    for k, entry in enumerate(entries):
        rows = np.load(shards / entry["file"]).astype(np.uint32)
        if k == 1:
            rows[3, 5] = 2**32 - 7
        data = shard_bytes(rows)
        (shards / entry["file"]).write_bytes(data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["dtype"] = "uint32"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    rows = open_split(shards, "train", vocab_size=50257, seq_len=32, verify=True)
    rows.rows(np.arange(entries[0]["rows"]))  # the intact first shard still reads
    with pytest.raises(DataError, match=rf"{entries[1]['file']} holds token ids .* or below 0 \(damaged\)"):
        rows.rows(np.arange(rows.num_rows))


# ------------------------------------------------------------------ a prepare that finds no documents


def _empty_csvs(folder: Path, n: int = 1) -> str:
    folder.mkdir()
    for i in range(n):
        (folder / f"part-{i}.csv").write_text("abstract,title\n,a title\n   ,another\n")
    return str(folder)


def test_a_prepare_without_documents_leaves_no_folder(tmp_path, capsys):
    source = _empty_csvs(tmp_path / "corpus")
    out = tmp_path / "new" / "deeper" / "shards"
    with unchanged(tmp_path):
        r = run(capsys, "prepare", TINY, *SMALL, f"data.source={source}", f"data.shards_dir={out}")
    one_line(r, "no non-empty documents", "data.text_column")
    assert not (tmp_path / "new").exists()


def test_a_prepare_without_documents_leaves_existing_shards_as_they_were(shards, tmp_path, capsys):
    source = _empty_csvs(tmp_path / "corpus")
    with unchanged(tmp_path):  # the manifest it set aside comes back, byte for byte
        r = run(capsys, "prepare", TINY, *SMALL, f"data.source={source}", f"data.shards_dir={shards}",
                "--overwrite")
    one_line(r, "no non-empty documents")
    open_split(shards, "train", verify=True)


def test_a_prepare_without_documents_leaves_an_empty_folder_unmarked(tmp_path, capsys):
    """Also when the job is split over processes: the last one undoes the others' records."""
    source = _empty_csvs(tmp_path / "corpus", n=2)
    out = tmp_path / "shards"
    out.mkdir()
    args = ["prepare", TINY, *SMALL, f"data.source={source}", f"data.shards_dir={out}", "--num-processes", "2"]
    assert run(capsys, *args, "--process-id", "0").returncode == 0  # its unit done, waits for the other
    assert storage.folder_kind(out) == "shards"
    one_line(run(capsys, *args, "--process-id", "1"), "no non-empty documents")
    assert list(out.iterdir()) == [] and storage.folder_kind(out) is None


# ------------------------------------------------------------------ sources that are not regular files


def test_a_fifo_source_is_refused_at_once(tmp_path):
    fifo = tmp_path / "stream.csv"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "flax_gpt.cli", "prepare", TINY, *SMALL, f"data.source={fifo}",
           f"data.shards_dir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    one_line(r, "stream.csv is a FIFO (named pipe), not a regular file", "save the stream to a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.csv"]


def test_non_regular_files_in_globs_and_folders_are_refused(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.csv").write_text("abstract\nreal text\n")
    os.mkfifo(folder / "b.csv")
    with pytest.raises(DataError, match="b.csv is a FIFO"):
        resolve_source(str(folder / "*.csv"))
    with pytest.raises(DataError, match="b.csv is a FIFO"):
        resolve_source(str(folder))
    (folder / "b.csv").unlink()
    (folder / "b.csv").symlink_to("/dev/null")
    with pytest.raises(DataError, match="b.csv is a device"):
        resolve_source(str(folder / "b.csv"))
    (folder / "b.csv").unlink()
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.bind(str(folder / "b.csv"))
        except OSError:  # a path too long for a socket name
            pytest.skip("cannot bind a unix socket here")
        with pytest.raises(DataError, match="b.csv is a socket"):
            resolve_source(str(folder))


# ------------------------------------------------------------------ command-line values


@pytest.mark.parametrize("argv,needle", [
    (["generate", "run", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "run", "--prompt", "x", "--temperature", "inf"], "(got inf)"),
    (["generate", "run", "--prompt", "x", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["generate", "run", "--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
    (["generate", "run", "--prompt", "x", "--seed", str(2**70)], "use an integer in [0, 4294967295]"),
    (["generate", "run", "--prompt", "x", "--seed", "-1"], "--seed -1 is out of range"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens and --num-samples"),
    (["generate", "run", "--prompt", "x", "--num-samples", "-3"], "(got 64, -3)"),
    (["report", "run", "--samples", "-1"], "--samples must be >= 0"),
    (["report", "run", "--max-new-tokens", "0"], "--max-new-tokens >= 1"),
    (["bench", TINY, "--steps", "0"], "--steps must be at least 1"),
    (["bench", TINY, "--warmup", "-1"], "--warmup at least 0"),
    (["eval", "run", "--data", "synthetic", "--seq-len", "0"], "--seq-len must be at least 1"),
    (["prepare", TINY, "--num-processes", "0", "--process-id", "0"], "--num-processes must be at least 1 (got 0)"),
    (["prepare", TINY, "--num-processes", "-2"], "--num-processes must be at least 1 (got -2)"),
    (["prepare", TINY, "--process-id", "1"], "--num-processes N and --process-id I go together"),
    (["prepare", TINY, "--num-processes", "2"], "go together"),
    (["prepare", TINY, "--num-processes", "2", "--process-id", "-1"], "--process-id -1 must be in [0,"),
    (["prepare", TINY, "--distributed", "--num-processes", "2", "--process-id", "0"], "--distributed detects"),
    (["train", TINY, "--num-processes", "2", "--process-id", "1"], "add --coordinator HOST:PORT"),
    (["train", TINY, "--num-processes", "0", "--process-id", "0"], "--num-processes must be at least 1"),
    (["train", TINY, "--process-id", "0"], "go together"),
])
def test_nonsense_command_line_values_are_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    one_line(run(capsys, *argv), needle)
    assert not any(tmp_path.iterdir())  # refused before anything is read or written
