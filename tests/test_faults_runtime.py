"""Faults that happen while a verb runs, through the CLI as a user meets them: XLA running out of
memory, a damaged latest checkpoint, a disk that fills up during an export, a model too large for
the host, `compile --out` onto a run's file, and a run that fails before its first step with the
profiler on. Each ends in one line (an `error: ...`, or for the fallback one warning per damaged
checkpoint), a non-zero exit for the errors, and nothing already written lost or left looking
complete.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
from test_faults import BASE, TINY, _env, cli, one_line, train, unchanged

from flax_gpt import process, storage
from flax_gpt.cli import main
from flax_gpt.errors import ResourceError
from flax_gpt.process import as_user_error, out_of_memory_line
from flax_gpt.train import host_memory

GiB = 1024**3


def run_in_process(capsys, *argv) -> SimpleNamespace:
    """`flax-gpt ARGV` in this process (so a writer can be made to fail), read like a subprocess."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


# `python -m flax_gpt.cli ARGS` that first caps its own address space (before jax is imported).
_LIMITED = ("import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
            "resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1])); "
            "sys.argv[0] = 'flax-gpt'; runpy.run_module('flax_gpt.cli', run_name='__main__')")


def limited(*args, cwd: Path, address_space: int, tmpdir: Path):
    """The CLI in a process that may map at most `address_space` bytes: an allocation past it fails
    at once on any host, as on a machine that has only that much memory."""
    return subprocess.run([sys.executable, "-c", _LIMITED, str(address_space), *map(str, args)], cwd=cwd,
                          env={**_env(), "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=600,
                          check=False)


# ------------------------------------------------------------------ out of memory


def test_out_of_memory_in_the_first_step_is_one_line_and_leaves_no_run(trained_run, tmp_path):
    """A batch whose step needs ~12.6 GiB on a host that can give 8: XLA's RESOURCE_EXHAUSTED at run
    time becomes one line with the size and what to change. The profiler was tracing that step: the
    failed start leaves no run directory (no profile/ without a marker) and no trace folder behind."""
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with unchanged(tmp_path, "tmp"):
        r = limited("train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=run", "train.batch_size=16384",
                    "train.steps=2", "train.profile_steps=0:2", cwd=tmp_path, address_space=8 * GiB, tmpdir=tmp)
        line = one_line(r, "out of memory: host memory ran out (could not allocate", "GiB)", "train.batch_size",
                        "train.grad_accum", "model.remat=full", "mesh.fsdp")
    assert "RESOURCE_EXHAUSTED" not in line and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(storage.TMP_PREFIX)]


@pytest.mark.parametrize("message, needles", [
    (("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.43G "
      "of 15.48G hbm. Exceeded hbm capacity by 4.95G.\n\nTotal hbm usage >= 20.95G:\n    reserved 530.00M"),
     ("TPU HBM ran out (20.43 GiB used of 15.48 GiB HBM)",)),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes.",
     ("memory ran out (could not allocate 4.00 GiB)",)),
    (("RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 1.00G. That was not possible. "
      "There are 500.00M free."), ("could not allocate 1.00 GiB; 0.49 GiB free",)),
], ids=["tpu-compile", "gpu-run", "tpu-run"])
def test_an_accelerators_out_of_memory_is_one_line(capsys, monkeypatch, message, needles):
    """The wordings of XLA:TPU and XLA:GPU, raised as jax raises them (JaxRuntimeError), from inside
    a verb and wrapped by a library on the way: one line at the CLI's one error boundary."""
    from flax_gpt.bench import tpu_compile

    def compile_for_topology(*a, **k):
        try:
            raise jax.errors.JaxRuntimeError(message)
        except jax.errors.JaxRuntimeError as e:
            raise RuntimeError("the step failed") from e

    monkeypatch.setattr(tpu_compile, "compile_for_topology", compile_for_topology)
    r = run_in_process(capsys, "compile", TINY, "--topology", "v5e-4")
    line = one_line(r, "out of memory:", "train.batch_size", "model.remat=full", "mesh.fsdp", *needles)
    assert "\n" not in line and len(line) < 400
    assert as_user_error(ValueError("RESOURCE_EXHAUSTED")).__class__ is ValueError  # not XLA's: left alone
    assert isinstance(as_user_error(jax.errors.JaxRuntimeError(message), "generate"), ResourceError)
    assert "--max-new-tokens" in out_of_memory_line(message, "generate")


# ------------------------------------------------------------------ a damaged latest checkpoint


def _damage(step_dir: Path) -> None:
    """Cut in half every data file of a checkpoint's parameters. How Orbax spreads the arrays over
    those files depends on the timing of its writes, so every file is cut: no array is left whole
    to read back. Whether the other reads are caught in flight when the first fails depends on
    timing too; the filter for them is tested below, deterministically."""
    files = list((step_dir / "params").glob("ocdbt.process_0/d/*"))
    assert files, f"no OCDBT data files under {step_dir}"
    for victim in files:
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)


@pytest.mark.parametrize("damaged", [[4], [4, 2]], ids=["latest", "all"])
def test_damaged_checkpoints_are_set_aside_with_one_line_each(trained_run, tmp_path, damaged):
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    for step in damaged:
        _damage(run / "checkpoints" / str(step))
    kept = {step: {str(p.relative_to(run / "checkpoints" / str(step))): p.read_bytes()
                   for p in (run / "checkpoints" / str(step)).rglob("*") if p.is_file()} for step in damaged}
    r = train(tmp_path, "data.shards_dir=shards", "train.run_dir=run", "train.steps=4")
    assert r.returncode == 0, r.stderr
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == len(damaged), r.stderr
    aside = run / "damaged_checkpoints"
    thens = ["falling back to checkpoint 2", "no readable checkpoint is left, so training starts again from step 0"]
    for line, step, then in zip(lines, damaged, thens):
        assert line.startswith(f"warning: checkpoint {step} is unreadable (") and " reading " in line, line
        assert line.endswith(f"; moved to {aside / str(step)}; {then}"), line
        # set aside whole, byte for byte: kept for inspection, never deleted
        assert {str(p.relative_to(aside / str(step))): p.read_bytes()
                for p in (aside / str(step)).rglob("*") if p.is_file()} == kept[step]
    assert ("resuming from checkpoint 2" in r.stdout) == (damaged == [4])


class _Pending:
    def __await__(self):
        yield


async def _read_like_orbax():
    """Orbax's array read: any exception, its own closing (GeneratorExit) included, re-raised."""
    try:
        await _Pending()
    except BaseException as e:
        raise Exception("Encountered error while reading array index: (slice(0, 64, 1),)") from e


@pytest.mark.parametrize("debug", [False, True])
def test_abandoned_reads_are_not_reported(monkeypatch, debug):
    """A read abandoned mid-flight (suspended, then closed when collected) turns its closing into an
    exception that Python reports through sys.unraisablehook ("Exception ignored in: <coroutine
    ...>" and its traceback); the CLI drops these echoes of the failure its own line names, and
    shows them with --debug. Other reports still go through."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)  # the default hook prints them
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])  # none from an earlier CLI call; restored after the test
    process._quiet_closed_loops(debug)
    read = _read_like_orbax()
    read.send(None)  # in flight: suspended at its await, as the other reads are when one fails
    del read
    gc.collect()
    # a read that failed, reported again from a callback once nobody waits for it
    failed = Exception(f"{process.ORBAX_READ_ERROR}: (slice(0, 32, 1),). See full TensorStore details: ...")
    failed.__cause__ = ValueError("OUT_OF_RANGE: Error reading ...")
    # at interpreter shutdown, when the module's globals are gone, the hook still knows its echoes
    monkeypatch.setattr(process, "ORBAX_READ_ERROR", None)
    monkeypatch.setattr(process, "inspect", None)
    another = ValueError("another")
    sys.unraisablehook(SimpleNamespace(exc_value=failed, object=None))
    sys.unraisablehook(SimpleNamespace(exc_value=another, object=None))
    # only this test's reports: the collection may also find what earlier tests left behind
    ours = [u for u in reported if u.exc_value is failed or u.exc_value is another
            or getattr(u.object, "__name__", None) == "_read_like_orbax"]
    assert [type(u.exc_value).__name__ for u in ours] == (["Exception"] * 2 if debug else []) + ["ValueError"]
    # asyncio's log line for a failed read nobody awaited
    records = []
    monkeypatch.setattr(asyncio_log, "callHandlers", records.append)  # what passes the filters
    for message in ("Future exception was never retrieved\nfuture: <Future finished exception=ValueError()>",
                    "Task exception was never retrieved", "Unclosed event loop"):
        asyncio_log.error(message)
    assert [r.getMessage().split("\n")[0] for r in records] == ([] if not debug else [
        "Future exception was never retrieved", "Task exception was never retrieved"]) + ["Unclosed event loop"]


@pytest.mark.parametrize("debug", [False, True])
def test_reads_abandoned_before_they_start_are_not_reported(monkeypatch, debug):
    """A read abandoned before it started is collected unstarted: Python warns "coroutine ... was
    never awaited" (and to enable tracemalloc), an echo the CLI drops too, and shows with --debug.
    Other RuntimeWarnings still go through."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        process._quiet_closed_loops(debug)
        read = _read_like_orbax()
        del read
        gc.collect()
        warnings.warn("another", RuntimeWarning, stacklevel=1)
    # only this test's warnings: the collection may also find coroutines earlier tests left behind
    ours = [str(w.message) for w in shown if "'_read_like_orbax'" in str(w.message) or str(w.message) == "another"]
    assert ours == (["coroutine '_read_like_orbax' was never awaited"] if debug else []) + ["another"]


def test_a_damaged_metrics_file_is_one_line(trained_run, tmp_path):
    """Orbax reads every step's metrics when it opens the folder: one that is not JSON is named."""
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    metrics = run / "checkpoints" / "4" / "metrics" / "metrics"
    metrics.write_bytes(metrics.read_bytes()[:5])
    with unchanged(tmp_path):
        one_line(train(tmp_path, "data.shards_dir=shards", "train.run_dir=run", "train.steps=6"),
                 "checkpoint 4", "metrics file is not valid JSON", "damaged_checkpoints/")
        one_line(cli("eval", "run", "--step", "2", cwd=tmp_path), "checkpoint 4", "metrics file is not valid JSON")


# ------------------------------------------------------------------ disk full during an export


def _export_world(trained_run: Path, tmp_path: Path, earlier: bool) -> Path:
    shutil.copytree(trained_run / "run", tmp_path / "run")
    if earlier:
        shutil.copytree(trained_run / "export", tmp_path / "exp")
    return tmp_path / "exp"


def test_disk_full_while_writing_the_weights_keeps_the_earlier_export(trained_run, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own error type, with the OS error as text."""
    from safetensors import SafetensorError

    from flax_gpt.export import hf_folder

    exp = _export_world(trained_run, tmp_path, earlier=True)
    real = hf_folder.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(Path(filename).stat().st_size // 2)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf_folder, "save_file", half_then_full)
    with unchanged(tmp_path):
        line = one_line(run_in_process(capsys, "export", tmp_path / "run", "--out", exp, "--overwrite"),
                        f"could not write the export {exp} (No space left on device)",
                        "the earlier export there is unchanged", "free disk space")
    assert "Traceback" not in line


def test_disk_full_midway_leaves_no_export_at_all(trained_run, tmp_path, monkeypatch, capsys):
    """A plain OSError(ENOSPC) from a later file (config.json, after the weights): no folder at
    --out, and no staging folder left beside it."""
    exp = _export_world(trained_run, tmp_path, earlier=False)
    real = Path.write_text

    def full_at_config(self, data, *a, **k):
        if self.name == "config.json" and self.parent.name.startswith(storage.TMP_PREFIX):
            real(self, data[: len(data) // 2], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_at_config)
    with unchanged(tmp_path):
        one_line(run_in_process(capsys, "export", tmp_path / "run", "--out", exp),
                 f"could not write the export {exp} (No space left on device)", "nothing was written there")
    assert not exp.exists()


# ------------------------------------------------------------------ a model too large for the host


def test_a_model_too_large_for_the_host_is_refused_before_allocating(trained_run, tmp_path):
    """831B parameters: ~12 TiB of parameters, gradients and AdamW state. The estimate refuses it
    from shapes alone; were it missing, building the state would try to allocate it (and, with the
    address space capped, fail as XLA's out-of-memory instead of this line)."""
    need = 831e9 * 4 * 4
    available = host_memory.available_bytes()
    if available is None or available > need:
        pytest.skip("no MemAvailable here, or a host with more memory than the model needs")
    (tmp_path / "shards").symlink_to(trained_run / "shards")
    (tmp_path / "tmp").mkdir()
    with unchanged(tmp_path, "tmp"):
        r = limited("train", TINY, *BASE, "data.shards_dir=shards", "train.run_dir=run", "model.n_layer=4",
                    "model.n_embd=131072", "model.n_head=4", cwd=tmp_path, address_space=16 * GiB,
                    tmpdir=tmp_path / "tmp")
        one_line(r, "training 4 layers x 131072 wide (831.", "needs at least", "GiB of host memory",
                 "optimizer state", "is available", "smaller model", "mesh.fsdp")
    assert not (tmp_path / "run").exists()


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:    2000000 kB\n")
    assert host_memory.available_bytes(str(meminfo)) == 2_000_000 * 1024
    assert host_memory.available_bytes(str(tmp_path / "absent")) is None
    host_memory.check_host_memory(GiB, "parameters 1.0", "x", fix="y", available=2 * GiB)  # fits: silent
    with pytest.raises(ResourceError, match=r"x needs at least 3.0 GiB of host memory \(parameters 3.0 GiB\) "
                                            r"but 2.0 GiB is available; y"):
        host_memory.check_host_memory(3 * GiB, "parameters 3.0", "x", fix="y", available=2 * GiB)


# ------------------------------------------------------------------ compile --out


@pytest.mark.parametrize("out, needles", [
    ("run/config.yaml", ("--out run/config.yaml is inside the run directory",)),
    ("exp/result.json", ("--out exp/result.json is inside the export folder",)),
    ("notes", ("--out notes is a folder",)),
], ids=["run-file", "export-file", "folder"])
def test_compile_out_is_checked_like_bench_out(trained_run, tmp_path, capsys, monkeypatch, out, needles):
    """Refused before libtpu is loaded or anything compiled: a run's files are the run's."""
    from flax_gpt.bench import tpu_compile

    shutil.copytree(trained_run / "run", tmp_path / "run")
    shutil.copytree(trained_run / "export", tmp_path / "exp")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("my notes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tpu_compile, "compile_for_topology", lambda *a, **k: pytest.fail("compiled before the check"))
    with unchanged(tmp_path):
        one_line(run_in_process(capsys, "compile", TINY, "--topology", "v5e-4", "--out", out), *needles)


def test_compile_out_writes_a_new_file(tmp_path, capsys, monkeypatch):
    from flax_gpt.bench import tpu_compile

    monkeypatch.setattr(tpu_compile, "compile_for_topology", lambda *a, **k: {"fits": True, "topology": "v5e-4"})
    r = run_in_process(capsys, "compile", TINY, "--topology", "v5e-4", "--out", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(r.stdout)
