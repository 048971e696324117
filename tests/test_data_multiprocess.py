"""2 processes x 2 fake CPU devices build the same global batches as 1 process x 4 devices.

Each run is a subprocess (tests/mp_loader_worker.py) so XLA_FLAGS and jax.distributed apply
before jax starts; the two-process run joins over 127.0.0.1 with gloo CPU collectives.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from flax_gpt.config import DataConfig
from flax_gpt.data.prepare import prepare_shards

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "mp_loader_worker.py"
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(shards, out: Path, pid: int, nproc: int, port: int, ndev: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(WORKER), str(shards), str(out), str(pid), str(nproc),
                             str(port), str(ndev)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_all(procs: list[subprocess.Popen]) -> None:
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def assemble(files: list[Path]) -> dict[str, np.ndarray]:
    """Global arrays rebuilt from every process's addressable shards (and their gathered copies)."""
    parts: dict[str, dict[int, np.ndarray]] = {}
    gathered: dict[str, np.ndarray] = {}
    for f in files:
        with np.load(f) as z:
            for key in z.files:
                if "/shard@" in key:
                    name, start = key.split("/shard@")
                    parts.setdefault(name, {})[int(start)] = z[key]
                elif key.endswith("/gathered"):
                    name = key[: -len("/gathered")]
                    if name in gathered:  # every process gathers the same global array
                        np.testing.assert_array_equal(gathered[name], z[key])
                    gathered[name] = z[key]
    out = {}
    for name, by_start in parts.items():
        starts = sorted(by_start)
        arr = np.concatenate([by_start[s] for s in starts])
        assert starts == [i * by_start[starts[0]].shape[0] for i in range(len(starts))]
        np.testing.assert_array_equal(arr, gathered[name])
        out[name] = arr
    return out


def test_two_processes_match_one_process(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_docs=60, seq_len=32, rows_per_shard=64,
                     val_fraction=0.15, shards_dir=str(tmp_path / "s"))
    manifest = prepare_shards(cfg, log=lambda *_: None)
    assert manifest["splits"]["val"]["rows"] % 8  # the last eval batch is padded

    single = tmp_path / "single.npz"
    run_all([launch(cfg.shards_dir, single, 0, 1, free_port(), 4)])
    port = free_port()
    multi = [tmp_path / f"p{i}.npz" for i in range(2)]
    run_all([launch(cfg.shards_dir, multi[i], i, 2, port, 2) for i in range(2)])

    one, two = assemble([single]), assemble(multi)
    assert set(one) == set(two) and any(k.startswith("eval") for k in one)
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    # Each process fed only its half of the batch.
    with np.load(multi[0]) as a, np.load(multi[1]) as b:
        assert a["local_rows"].tolist() == [0, 1, 2, 3] and b["local_rows"].tolist() == [4, 5, 6, 7]
    with np.load(single) as z:
        assert z["local_rows"].tolist() == list(range(8))
    # And the batches are not trivially equal to each other (the comparison has teeth).
    assert not np.array_equal(one["train0/inputs"], one["train1/inputs"])
