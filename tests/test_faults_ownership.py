"""Data loss and concurrency, through the CLI as a user meets them: a folder is ours only by its
marker, `--overwrite` replaces only what we wrote, staging folders of one writer are never another's
to clean, one process trains a run directory at a time, and a killed `import-hf` completes when
run again. Each refusal is one line `error: ...` (exit 2) and leaves every file byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_faults import BASE, TINY, cli, one_line, train, unchanged

from flax_gpt import storage
from flax_gpt.errors import OutputError
from flax_gpt.train.run_lock import RunLock, check_free


def _wait_for(predicate, what: str, timeout: float = 300, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    pytest.fail(f"timed out waiting for {what}")


def _steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


# ------------------------------------------------------------------ ownership by marker only


def test_prepare_overwrite_onto_users_npy_and_manifest_is_refused(tmp_path):
    """A folder of the user's own arrays with a manifest.json that has a format_version looks like
    shards; without our marker it is not ours, and --overwrite deletes none of it."""
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "train-00000-00000.npy", np.arange(64, dtype=np.uint16).reshape(2, 32))
    np.save(data / "embeddings.npy", np.ones((3, 4), np.float32))
    (data / "manifest.json").write_text(json.dumps({"format_version": 3, "splits": {}, "mine": True}))
    with unchanged(tmp_path):
        one_line(cli("prepare", TINY, *BASE, "data.shards_dir=data", "--overwrite", cwd=tmp_path),
                 "data is not empty and was not written by flax-gpt", "embeddings.npy", "manifest.json")


def test_a_users_config_and_empty_checkpoints_is_no_run_directory(trained_run, tmp_path):
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "config.yaml").write_text("# my own experiment notes\nlr: 3e-4\n")
    with unchanged(tmp_path):
        one_line(train(tmp_path, "data.shards_dir=shards", "train.run_dir=mine", "train.steps=2"),
                 "mine is not empty and was not written by flax-gpt", "checkpoints/", "config.yaml")


def test_looks_are_no_proof_of_ownership(tmp_path):
    """In-process: the content shapes that used to pass for a run, shards and an export."""
    shapes = {"run": ["config.yaml", "checkpoints/"], "shards": ["manifest.json"],
              "export": ["config.json", "training_config.json"]}
    for kind, names in shapes.items():
        folder = tmp_path / kind
        folder.mkdir()
        for n in names:
            (folder / n.rstrip("/")).mkdir() if n.endswith("/") else \
                (folder / n).write_text(json.dumps({"format_version": 3}))
        assert storage.folder_kind(folder) is None
        with pytest.raises(OutputError, match="not written by flax-gpt"):
            storage.check_output(folder, kind, overwrite=True, reuse=True)


# ------------------------------------------------------------------ --overwrite replaces only what we wrote


def test_export_overwrite_refuses_an_export_holding_a_run_and_shards(trained_run, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(trained_run / "export", exp)
    shutil.copytree(trained_run / "run", tmp_path / "run")
    shutil.copytree(trained_run / "run", exp / "old-run")  # the user moved these in afterwards
    shutil.copytree(trained_run / "shards", exp / "shards")
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    with unchanged(tmp_path):
        line = one_line(cli("export", "run", "--out", "exp", "--overwrite", cwd=tmp_path),
                        "exp holds an export folder and also", "old-run/ (a run directory)",
                        "shards/ (a shards folder)", "nothing was replaced")
        assert "model.safetensors" not in line  # what the export wrote is not named as foreign
        # The end of training replaces its export the same way: refused before training starts.
        one_line(train(tmp_path, "data.shards_dir=shards", "train.run_dir=run", "train.steps=6",
                       "train.export_dir=exp", "--overwrite"), "old-run/ (a run directory)")
    # Once only the export's own files are left, --overwrite replaces it.
    shutil.rmtree(exp / "old-run")
    shutil.rmtree(exp / "shards")
    before = (exp / storage.MARKER).read_bytes()
    r = cli("export", "run", "--out", "exp", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (exp / storage.MARKER).read_bytes() != before and (exp / "model.safetensors").is_file()


# ------------------------------------------------------------------ foreign folders


def test_bench_out_inside_a_run_is_refused(trained_run, tmp_path):
    shutil.copytree(trained_run / "run", tmp_path / "run")
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    with unchanged(tmp_path):
        one_line(cli("bench", TINY, *BASE, "data.shards_dir=shards", "--out", "run/config.yaml", "--steps", "1",
                     "--baseline", "none", cwd=tmp_path), "--out run/config.yaml is inside the run directory")


def test_an_out_file_may_not_sit_in_any_output_of_ours(trained_run, tmp_path):
    for name in ("shards", "export"):
        shutil.copytree(trained_run / name, tmp_path / name)
    with pytest.raises(OutputError, match="inside the shards folder"):
        storage.check_output_file(tmp_path / "shards" / "manifest.json", "--out")
    with pytest.raises(OutputError, match="inside the export folder"):
        storage.check_output_file(tmp_path / "export" / "sub" / "bench.json", "--out")
    with pytest.raises(OutputError, match="is a folder"):
        storage.check_output_file(tmp_path / "export", "--out")
    storage.check_output_file(tmp_path / "bench.json", "--out")  # anywhere else: fine


# ------------------------------------------------------------------ staging folders


def test_an_export_cleans_only_its_own_and_dead_writers_staging(trained_run, tmp_path):
    """Two exports started together to `a` and `a-b`: the one to `a` must not take the other's
    live staging folder for its own leftovers. The other writer is simulated by a live process."""
    host = socket.gethostname()
    other = subprocess.Popen(["sleep", "600"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        live_ab = tmp_path / f".flax_gpt-tmp-a-b-{other.pid}-{time.time_ns()}@{host}"
        live_a = tmp_path / f".flax_gpt-tmp-a-{other.pid}-{time.time_ns()}@{host}"  # another export to `a`
        dead_a = tmp_path / f".flax_gpt-tmp-a-{gone.pid}-{time.time_ns()}@{host}"
        elsewhere = tmp_path / f".flax_gpt-tmp-a-{gone.pid}-{time.time_ns()}@another-host"
        for folder in (live_ab, live_a, dead_a, elsewhere):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"being written")
        r = cli("export", trained_run / "run", "--out", "a", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live_ab.name, live_a.name, elsewhere.name])
        assert (live_ab / "model.safetensors").read_bytes() == b"being written"
    finally:
        other.kill()
        other.wait()


# ------------------------------------------------------------------ the run lock


def test_a_second_train_is_refused_and_a_killed_holders_lock_is_taken_over(trained_run, tmp_path):
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    args = ["data.shards_dir=shards", "train.run_dir=run", "checkpoint.every=2"]
    first = train(tmp_path, *args, "train.steps=100000", wait=False)
    try:
        for line in first.stdout:  # the loop's phase lines, flushed as said
            if line.startswith("compiling the train step"):
                break
        else:
            pytest.fail(f"the first train ended: {first.stderr.read()[-2000:]}")
        lock = tmp_path / "run" / storage.LOCK_FILE
        assert json.loads(lock.read_text())["pid"] == first.pid
        one_line(train(tmp_path, *args, "train.steps=100000"), "run directory run is in use by",
                 f"process {first.pid} on host {socket.gethostname()}")
        _wait_for(lambda: _steps(tmp_path / "run"), "a checkpoint of the first train", proc=first)
        assert first.poll() is None  # the second process did not stop or disturb the first
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert lock.exists()  # left behind by kill -9, but no longer held by anyone
    latest = _steps(tmp_path / "run")[-1]
    r = train(tmp_path, *args, f"train.steps={latest + 2}")
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint {latest}" in r.stdout
    assert _steps(tmp_path / "run")[-1] == latest + 2 and not lock.exists()  # released: the file goes


def test_the_lock_in_process_refuses_a_second_holder_and_frees_on_release(tmp_path):
    run = tmp_path / "fresh" / "run"
    held = RunLock(run).acquire()
    assert (run / storage.LOCK_FILE).is_file()
    with pytest.raises(OutputError, match=f"in use by process {os.getpid()} on host"):
        RunLock(run).acquire()  # flock is per open file: a second holder in this process conflicts too
    with pytest.raises(OutputError, match=f"in use by process {os.getpid()}"):
        check_free(run)
    assert storage.check_output(run, "run") is False  # the lock file is no content: the folder counts as empty
    held.release()
    assert not (tmp_path / "fresh").exists()  # what the lock created, and nothing else, is gone
    check_free(run)
    # A lock file whose holder died (its record names a dead process): free, and taken over.
    run.mkdir(parents=True)
    (run / storage.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone"}))
    again = RunLock(run).acquire()
    assert json.loads((run / storage.LOCK_FILE).read_text())["pid"] == os.getpid()
    again.release()
    assert run.is_dir() and not (run / storage.LOCK_FILE).exists()  # the folder was there before: kept


# ------------------------------------------------------------------ import-hf resumable


def test_import_hf_killed_midway_completes_when_run_again(trained_run, tmp_path):
    src = trained_run / "export"
    proc = cli("import-hf", src, "--out", "imported", cwd=tmp_path, wait=False)

    def writing() -> bool:  # its staging folder exists and holds the checkpoint being written
        return any(p.name.startswith(".flax_gpt-tmp-imported-") and (p / "checkpoints").exists()
                   for p in tmp_path.iterdir())

    try:
        _wait_for(writing, "import-hf to write its staging folder", proc=proc)
    finally:
        proc.kill()
        proc.communicate()
    assert not (tmp_path / "imported").exists()  # the target is untouched until the import is whole
    r = cli("import-hf", src, "--out", "imported", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]  # the killed one's staging is gone
    assert storage.folder_kind(tmp_path / "imported") == "run" and _steps(tmp_path / "imported") == [0]
    r = cli("generate", "imported", "--prompt", "The", "--max-new-tokens", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # the checkpoint, renamed into place, reads back


def test_a_cut_short_upload_is_ours_to_redo_and_a_finished_one_is_not(tmp_path):
    """A bucket output is uploaded marker first, marked incomplete (a bucket has no rename): the next
    write of its kind replaces it without --overwrite; a finished one still needs it."""
    half = tmp_path / "half"
    storage.mark(half, "run", incomplete=True)
    (half / "config.yaml").write_text("half")
    assert storage.check_output(half, "run") is True
    storage.mark(tmp_path / "whole", "run")
    (tmp_path / "whole" / "config.yaml").write_text("whole")
    with pytest.raises(OutputError, match="already holds a run directory"):
        storage.check_output(tmp_path / "whole", "run")
