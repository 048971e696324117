"""Faults and bad input through the CLI, as a user meets them: every case ends in one line
`error: ...` (exit 2) or its documented message, and nothing outside the intended output changes
(every file under the test's folder is hashed before and after).

Then the property test: `kill -9` at random moments of a run (including during a checkpoint save
and during the final export), rerun after each, and the losses equal an uninterrupted run bit for
bit, with no temporary files left behind. And a full disk during a checkpoint save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAINED_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = TRAINED_OVERRIDES  # the shared trained run's settings (conftest)


def _env(devices: int = 1) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def cli(*args, cwd: Path, devices: int = 1, timeout: int = 600, wait: bool = True):
    cmd = [sys.executable, "-m", "flax_gpt.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=cwd, env=_env(devices), capture_output=True, text=True, timeout=timeout)


def train(cwd: Path, *overrides, **kw):
    return cli("train", TINY, *BASE, *overrides, cwd=cwd, **kw)


def one_line(r, *needles, code: int = 2) -> str:
    """Exit `code` and exactly one line on stderr, `error: ...`, containing every needle."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: relative path -> content hash ('dir' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def unchanged(root: Path, *allowed: str):
    """Nothing under root changes, except paths under the `allowed` prefixes."""
    before = snapshot(root)
    yield
    after = snapshot(root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed = {k for k in changed if not any(k == a or k.startswith(a + "/") for a in allowed)}
    assert not changed, f"changed outside the intended output: {sorted(changed)[:10]}"


@contextlib.contextmanager
def read_only(path: Path):
    """Make a folder unwritable: permissions for a normal user; a read-only bind mount for root."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    for cmd in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip("cannot make a read-only folder here (root without mount permission)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_run) -> Path:
    """A project folder as a user has it: shards, a trained run (checkpoints 2 and 4, evaluated),
    its export, another seq_len's shards, a folder of someone else's notes and a plain file."""
    w = tmp_path_factory.mktemp("world")
    for name in ("shards", "run", "export"):
        shutil.copytree(trained_run / name, w / name)
    assert cli("prepare", TINY, *BASE, "data.seq_len=64", "data.shards_dir=shards64", cwd=w).returncode == 0
    (w / "notes").mkdir()
    (w / "notes" / "notes.txt").write_text("my notes")
    (w / "afile.txt").write_text("a file")
    (w / "bad.yaml").write_text("model:\n  preset: tiny\ntrain: 5\n")
    (w / "broken.yaml").write_text("model: [unclosed\n")
    pickles = w / "pickle_model"
    pickles.mkdir()
    shutil.copy(w / "export" / "config.json", pickles / "config.json")
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    return w


RUN = ["data.shards_dir=shards", "train.run_dir=run", "train.eval_every=2", "checkpoint.every=2"]

# (case id, argv, needles in the one error line). Each runs in the world folder and must change nothing.
REFUSED = [
    ("export-onto-run", ["export", "run", "--out", "run", "--overwrite"], ["is a run directory"]),
    ("export-into-run", ["export", "run", "--out", "run/checkpoints", "--overwrite"], ["inside the run directory"]),
    ("export-onto-shards", ["export", "run", "--out", "shards", "--overwrite"], ["is a shards folder"]),
    ("export-into-shards", ["export", "run", "--out", "shards/x"], ["inside the shards folder"]),
    ("export-onto-foreign", ["export", "run", "--out", "notes", "--overwrite"],
     ["not written by flax-gpt", "notes.txt"]),
    ("export-onto-file", ["export", "run", "--out", "afile.txt", "--overwrite"], ["is a file"]),
    ("export-existing-no-flag", ["export", "run", "--out", "export"], ["--overwrite"]),
    ("export-bad-step", ["export", "run", "--out", "e2", "--step", "7"], ["no checkpoint at step 7", "[2, 4]"]),
    ("export-bad-dtype", ["export", "run", "--out", "e2", "--dtype", "int8"], ["invalid choice"]),
    ("eval-step-abc", ["eval", "run", "--step", "abc"], ["'abc' is not a step number"]),
    ("eval-not-a-run", ["eval", "notes"], ["not a run directory"]),
    ("eval-missing", ["eval", "nowhere"], ["does not exist"]),
    ("generate-step-abc", ["generate", "run", "--step", "abc", "--prompt", "x"], ["'abc' is not a step number"]),
    ("generate-zero-tokens", ["generate", "run", "--prompt", "x", "--max-new-tokens", "0"], ["at least 1"]),
    ("generate-hf-pickle-jax", ["generate", "--hf", "pickle_model", "--prompt", "x"], ["only pickle weights"]),
    ("generate-hf-pickle-transformers", ["generate", "--hf", "pickle_model", "--prompt", "x", "--backend",
                                         "transformers"], ["only pickle weights"]),
    ("generate-hf-step", ["generate", "--hf", "export", "--step", "2", "--prompt", "x"], ["does not apply to --hf"]),
    ("bench-zero-steps", ["bench", TINY, *BASE, "data.shards_dir=shards", "--steps", "0"],
     ["--steps must be at least 1"]),
    ("config-section-not-mapping", ["train", "bad.yaml"], ["section 'train' must be a mapping"]),
    ("config-invalid-yaml", ["train", "broken.yaml"], ["not valid YAML"]),
    ("config-missing", ["train", "missing.yaml"], ["config file not found"]),
    ("config-unknown-key", ["train", TINY, "train.stpes=3"], ["did you mean 'train.steps'"]),
    ("no-training-asked", ["train", TINY, *BASE, "train.steps=0", "train.epochs=0"], ["ask for no training"]),
    ("unknown-verb", ["trian", TINY], ["invalid choice"]),
    ("missing-argument", ["export", "run"], ["--out"]),
    ("run-dir-is-file", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=afile.txt"], ["is a file"]),
    ("run-dir-is-foreign", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=notes"],
     ["not written by flax-gpt"]),
    ("run-dir-is-shards", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=shards"],
     ["is a shards folder"]),
    ("shards-dir-is-file", ["prepare", TINY, *BASE, "data.shards_dir=afile.txt"], ["is a file"]),
    ("shards-dir-is-run", ["prepare", TINY, *BASE, "data.shards_dir=run"], ["is a run directory"]),
    ("shards-dir-is-foreign", ["prepare", TINY, *BASE, "data.shards_dir=notes"], ["not written by flax-gpt"]),
    ("shards-from-other-inputs", ["prepare", TINY, *BASE, "data.shards_dir=shards", "data.seq_len=16"],
     ["different inputs", "data.seq_len 32 -> 16"]),
    ("source-missing", ["prepare", TINY, *BASE, "data.source=nowhere/x.csv", "data.shards_dir=s2"], ["not found"]),
    ("export-dir-foreign", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=r2",
                            "train.export_dir=notes"], ["not written by flax-gpt"]),
    ("export-dir-holds-another-runs-export", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=r2",
                                             "train.export_dir=export"], ["already holds an export of", "run",
                                                                          "--overwrite", "train.export_dir"]),
    ("flag-not-known-after-overrides", ["train", TINY, "train.steps=3", "--bogus-flag"],
     ["unrecognized", "--bogus-flag"]),
    ("eval-seq-len-on-own-split", ["eval", "run", "--seq-len", "16"], ["does not apply to the run's own"]),
    ("eval-shards-with-template", ["eval", "run", "--data", "shards", "--template", "{abstract}"],
     ["prepared shards folder"]),
    ("eval-shards-of-another-length", ["eval", "run", "--data", "shards64", "--seq-len", "32"],
     ["seq_len 64", "32"]),
    ("export-dir-is-run-dir", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=r2",
                               "train.export_dir=r2"], ["overlaps train.run_dir"]),
    ("export-dir-inside-run-dir", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=r2",
                                   "train.export_dir=r2/hf"], ["overlaps train.run_dir"]),
    ("resume-changed-result", ["train", TINY, *BASE, *RUN, "train.steps=6", "optim.learning_rate=0.5"],
     ["optim.learning_rate", "new train.run_dir"]),
    ("resume-other-seq-shards", ["train", TINY, *BASE, *RUN, "train.steps=6", "data.shards_dir=shards64"],
     ["different inputs"]),
    ("mesh-does-not-fit", ["train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=r3", "mesh.data=3"],
     ["mesh", "1 are available"]),
    ("import-into-run", ["import-hf", "export", "--out", "run"], ["already holds a run directory"]),
    ("import-into-foreign", ["import-hf", "export", "--out", "notes"], ["not written by flax-gpt"]),
    ("report-not-a-run", ["report", "shards"], ["not a run directory"]),
]


@pytest.mark.parametrize("case,argv,needles", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_one_line_and_nothing_changed(world, case, argv, needles):
    with unchanged(world):
        one_line(cli(*argv, cwd=world), *needles)


def test_failed_first_start_leaves_nothing_and_accepts_a_corrected_config(world, tmp_path):
    (tmp_path / "shards").symlink_to(world / "shards")
    with unchanged(tmp_path):  # the batch does not split over 2 devices: nothing may be created
        one_line(train(tmp_path, "data.shards_dir=shards", "train.run_dir=fresh", "train.batch_size=3",
                       "train.steps=2", devices=2), "not divisible")
    assert not (tmp_path / "fresh").exists()
    r = train(tmp_path, "data.shards_dir=shards", "train.run_dir=fresh", "train.batch_size=4", "train.steps=2",
              devices=2)
    assert r.returncode == 0, r.stderr


def test_unreadable_checkpoints_are_one_line_everywhere_and_not_moved(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and "ocdbt" in str(f.parent) and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with unchanged(tmp_path, "out"):
        one_line(cli("eval", run, cwd=tmp_path), "checkpoint 4", "unreadable")
        one_line(cli("export", run, "--out", tmp_path / "out", cwd=tmp_path), "checkpoint 4", "unreadable")
        one_line(cli("generate", run, "--prompt", "x", "--step", "2", cwd=tmp_path), "checkpoint 2", "unreadable")
    assert not (tmp_path / "out").exists()


def test_all_checkpoints_damaged_says_it_starts_again(world, tmp_path):
    (tmp_path / "shards").symlink_to(world / "shards")
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and "ocdbt" in str(f.parent):
            f.write_bytes(b"\0" * 8)
    r = train(tmp_path, *RUN, "train.steps=4")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "falling back to checkpoint 2" in out and "training starts again from step 0" in out
    assert sorted(p.name for p in (run / "damaged_checkpoints").iterdir()) == ["2", "4"]


def test_out_of_vocabulary_ids_name_the_shard(world, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(world / "shards", shards)
    victim = sorted(shards.glob("train-*.npy"))[0]
    arr = np.load(victim, mmap_mode="r+")
    arr[:, 3] = 60000  # >= GPT-2's 50257: a damaged shard, not a learning-rate problem
    arr.flush()
    del arr
    with unchanged(tmp_path):
        line = one_line(train(tmp_path, "data.shards_dir=shards", "train.run_dir=oov", "train.steps=2"),
                        victim.name, "vocab")
    assert "learning_rate" not in line and not (tmp_path / "oov").exists()


def test_too_small_for_a_validation_split_says_so_and_never_scores_it(tmp_path):
    # 20 documents, 5% held out by their text's hash: 2 documents, about 400 tokens, under one row of 512.
    small = ["data.synthetic_docs=20", "data.val_fraction=0.05", "data.seq_len=512", "model.n_positions=512",
             "data.shards_dir=s",
             "train.run_dir=run", "train.steps=2", "train.eval_every=1", "checkpoint.every=1"]
    r = train(tmp_path, *small)
    assert r.returncode == 0, r.stderr
    assert "no rows" in r.stdout and "no validation split" in r.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in rec for rec in records) and "val_loss" not in json.loads(r.stdout.splitlines()[-1])
    with unchanged(tmp_path):
        one_line(cli("eval", "run", cwd=tmp_path), "no tokens to evaluate")
        one_line(cli("export", "run", "--out", tmp_path / "e", "--step", "best", cwd=tmp_path),
                 "no checkpoint has a validation loss")


@pytest.mark.parametrize("what", ["run", "checkpoints", "shards"])
def test_read_only_folders_fail_fast_with_one_line(world, tmp_path, what):
    (tmp_path / "run").mkdir()
    shutil.copytree(world / "run", tmp_path / "run", dirs_exist_ok=True)
    shutil.copytree(world / "shards", tmp_path / "shards")
    target = tmp_path / ("run/checkpoints" if what == "checkpoints" else what)
    with read_only(target), unchanged(tmp_path):
        if what == "shards":
            r = cli("prepare", TINY, *BASE, "data.shards_dir=shards", "data.seq_len=16", "--overwrite",
                    cwd=tmp_path, timeout=120)
        else:
            r = train(tmp_path, *RUN, "train.steps=6", timeout=120)
        one_line(r, str(target.name), "not writable")


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (Linux: the SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_while_loading_is_one_line_and_writes_nothing(world, tmp_path):
    """SIGTERM once the CLI listens for it, while it loads jax and the libraries (seconds before any
    state exists): one line, exit 143, no run directory."""
    (tmp_path / "shards").symlink_to(world / "shards")
    proc = train(tmp_path, "data.shards_dir=shards", "train.run_dir=run", "train.steps=50", wait=False)
    deadline = time.time() + 120
    while proc.poll() is None and not _catches_sigterm(proc.pid) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert err.strip().splitlines() == ["terminated (SIGTERM); what was already written is complete; rerun the "
                                        "same command to continue"]
    assert not (tmp_path / "run").exists()


def test_sigterm_while_compiling_says_so_and_checkpoints_the_first_step(world, tmp_path):
    """SIGTERM while the first step compiles (the run says when it starts compiling): it is
    acknowledged at once on stderr, the step finishes, checkpoint 1 is written, exit 0."""
    (tmp_path / "shards").symlink_to(world / "shards")
    proc = train(tmp_path, "data.shards_dir=shards", "train.run_dir=run", "train.steps=50", wait=False)
    seen = []
    for line in proc.stdout:  # the loop's phase lines (tqdm.write), each flushed as it is said
        seen.append(line)
        if line.startswith("compiling the train step"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (seen, out, err)
    assert "SIGTERM: finishing the current step, then writing a checkpoint" in err
    assert "preempted: checkpoint 1 written" in err + out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_interrupted_export_leaves_no_temp_folder_after_the_next_export(world, tmp_path):
    stale = tmp_path / ".flax_gpt-tmp-out-4242-1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert cli("export", world / "run", "--out", tmp_path / "out", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_debug_shows_the_traceback(world):
    r = cli("--debug", "eval", "run", "--step", "abc", cwd=world)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


# ------------------------------------------------------------------------------------- kill -9


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a step repeated after a resume: the later line wins
    return out


def _temp_leftovers(root: Path) -> list[str]:
    pats = ("*.orbax-checkpoint-tmp*", ".flax_gpt-tmp-*", "*.tmp")
    return sorted(str(p.relative_to(root)) for pat in pats for p in root.rglob(pat))


def _kill_when(proc, predicate, timeout: float = 240) -> bool:
    """kill -9 the process once predicate() holds; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    return False


@pytest.mark.slow
def test_kill_9_anywhere_then_rerun_gives_the_uninterrupted_losses(tmp_path):
    pytest.importorskip("torch")
    args = ["data.shards_dir=shards", "train.run_dir=run", "train.steps=12", "train.eval_every=3",
            "checkpoint.every=3", "train.export_dir=export"]
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), dir_.mkdir()
    assert train(ref_dir, *args).returncode == 0
    ref = _losses(ref_dir / "run")
    run, ckpts = dir_ / "run", dir_ / "run" / "checkpoints"

    def saving():
        return ckpts.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in os.scandir(ckpts))

    def exporting():
        return any(p.name.startswith(".flax_gpt-tmp-export") for p in os.scandir(dir_))

    def lines_at_least(n):
        return lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= n

    rng = np.random.default_rng()
    moments = [("random start-up", lambda t0=[None]: (t0.__setitem__(0, t0[0] or time.time()) or
                                                      time.time() - t0[0] > rng.uniform(0.5, 4.0))),
               ("mid-run", lines_at_least(int(rng.integers(2, 6)))),
               ("during a save", saving),
               ("later mid-run", lines_at_least(int(rng.integers(8, 12)))),
               ("during the export", exporting)]
    killed = []
    for name, when in moments:
        if _kill_when(train(dir_, *args, wait=False), when):
            killed.append(name)
    assert len(killed) >= 4, killed  # a moment can pass unseen once; the others must have hit
    r = train(dir_, *args)
    assert r.returncode == 0, r.stderr
    got = _losses(run)
    assert sorted(got) == list(range(1, 13)) and all(got[s] == ref[s] for s in ref), (got, ref)
    assert _temp_leftovers(dir_) == []
    assert (dir_ / "export" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------ disk full


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one(world, small_disk):
    (small_disk / "shards").symlink_to(world / "shards")
    big = ["data.shards_dir=shards", "train.run_dir=run", "checkpoint.every=2", "checkpoint.keep=5"]
    filler = small_disk / "filler"

    def fill(leave: int) -> None:
        filler.write_bytes(os.urandom(max(0, shutil.disk_usage(small_disk).free - leave)))

    # The first save has no size to go by: the disk fills up during the write (TensorStore's
    # reports of its other pending writes to a closed event loop stay off stderr).
    fill(6_000_000)
    one_line(train(small_disk, *big, "train.steps=2"), "could not write checkpoint 2", "No space left on device",
             "no earlier checkpoint exists")
    filler.unlink()
    assert train(small_disk, *big, "train.steps=2").returncode == 0
    # Later saves are refused before writing when the previous checkpoint's size does not fit.
    fill(2_000_000)
    line = one_line(train(small_disk, *big, "train.steps=4"), "could not write checkpoint 4",
                    "No space left on device", "a checkpoint takes", "checkpoint 2 is intact")
    assert "rerun" in line
    filler.unlink()
    r = train(small_disk, *big, "train.steps=4")
    assert r.returncode == 0, r.stderr
    assert "resuming from checkpoint 2" in r.stdout
    assert _temp_leftovers(small_disk) == []


def test_enospc_from_the_writer_is_one_storage_error(tmp_path, monkeypatch):
    """Without a mountable disk: the checkpoint writer fails with ENOSPC in-process."""
    import errno

    import jax.numpy as jnp

    from flax_gpt.errors import StorageError
    from flax_gpt.train.run_dir import RunDir

    ckpt = RunDir(tmp_path).checkpointer(async_save=False)
    ckpt.save(1, {"w": jnp.ones(4)})
    ckpt.wait()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full)
    with pytest.raises(StorageError,
                       match="could not write checkpoint 2.*No space left on device.*checkpoint 1 is intact"):
        ckpt.save(2, {"w": jnp.ones(4)})
    monkeypatch.undo()
    ckpt.close()
    assert RunDir(tmp_path).checkpointer(read_only=True).steps() == [1]
