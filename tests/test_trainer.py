"""The trainer as users run it: exact resume, preemption, accumulation, meshes, multi-host, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small model on real GPT-2 vocab; dropout on so that resume must also restore the RNG stream.
BASE = [
    "model.preset=tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.n_positions=64",
    "data.source=synthetic", "data.synthetic_docs=200", "data.seq_len=32", "data.val_fraction=0.1",
    "train.batch_size=8", "train.progress=false", "optim.learning_rate=3e-3", "optim.warmup_steps=2",
    "optim.decay_steps=10", "optim.decay_rate=0.5", "checkpoint.async_save=true",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "s"
    r = _train_cli(None, f"data.shards_dir={d}", verb="prepare")
    assert r.returncode == 0, r.stderr
    return d


def _env(devices: int = 1, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _train_cli(run_dir, *overrides, verb="train", devices=1, extra_args=(), wait=True, timeout=600):
    args = [sys.executable, "-m", "flax_gpt.cli", verb, str(ROOT / "configs" / "tiny.yaml"), *BASE]
    if run_dir is not None:
        args.append(f"train.run_dir={run_dir}")
    args += list(overrides) + list(extra_args)
    if not wait:
        return subprocess.Popen(args, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=_env(devices), capture_output=True, text=True, timeout=timeout)


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_exact_resume_is_bitwise(shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [f"data.shards_dir={shards}", "train.eval_every=5", "checkpoint.every=5"]
    assert _train_cli(straight, "train.steps=20", *common).returncode == 0
    r = _train_cli(resumed, "train.steps=10", *common)
    assert r.returncode == 0, r.stderr
    r = _train_cli(resumed, "train.steps=20", *common)
    assert r.returncode == 0, r.stderr
    assert "resuming from checkpoint 10" in r.stdout
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == list(range(1, 21)) and sorted(b) == sorted(a)
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise on CPU, every step
    assert a[20] < a[1]  # and it learns


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(shards, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = [f"data.shards_dir={shards}", "train.steps=30"]
    assert _train_cli(straight, *common).returncode == 0
    proc = _train_cli(killed, *common, wait=False)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    rng = np.random.default_rng()
    target = int(rng.integers(3, 12))
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "preempted" in err + out
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 30
    assert _train_cli(killed, *common).returncode == 0
    a, b = _losses(straight), _losses(killed)
    assert all(a[s] == b[s] for s in range(1, 31))


def test_grad_accumulation_equals_one_big_batch(shards, tmp_path):
    common = [f"data.shards_dir={shards}", "train.steps=3", "model.embd_pdrop=0", "model.attn_pdrop=0",
              "model.resid_pdrop=0"]
    assert _train_cli(tmp_path / "a", *common).returncode == 0
    assert _train_cli(tmp_path / "b", *common, "train.grad_accum=4", "model.remat=true").returncode == 0
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    # The tolerance follows from the arithmetic: both runs sum the same float32 per-token losses in
    # other groupings (4 micro-batches; remat recomputes the forward). Each reduction is a tree sum,
    # within log2(n)·eps of exact (relative), over the batch's targets (8 rows x 31) and over the
    # vocabulary in each token's logsumexp; two such results differ by at most twice that. The
    # updates in between differ by the same rounding times the learning rate: far less.
    rtol = 2 * (np.log2(8 * 31) + np.log2(50257)) * np.finfo(np.float32).eps  # 5.6e-6: ~6e-5 at loss 10.8
    np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)], rtol=rtol, atol=0)


@pytest.mark.slow
def test_meshes_on_8_devices_match_one_device(shards, tmp_path):
    common = [f"data.shards_dir={shards}", "train.steps=3", "model.pad_vocab_to=128", "model.embd_pdrop=0",
              "model.attn_pdrop=0", "model.resid_pdrop=0"]
    assert _train_cli(tmp_path / "one", *common).returncode == 0
    ref = _losses(tmp_path / "one")
    for data, fsdp, tensor in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        run = tmp_path / f"m{data}{fsdp}{tensor}"
        r = _train_cli(run, *common, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", devices=8)
        assert r.returncode == 0, r.stderr
        got = _losses(run)
        np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], atol=1e-5)
    # Resume the (2,2,2) run on a (8,1,1) mesh: the checkpoint reshards on load.
    run = tmp_path / "m222"
    r = _train_cli(run, *common, "train.steps=5", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", devices=8)
    assert r.returncode == 0, r.stderr and "resuming from checkpoint 3" in r.stdout
    straight = tmp_path / "one5"
    assert _train_cli(straight, *common, "train.steps=5").returncode == 0
    np.testing.assert_allclose([_losses(run)[s] for s in (4, 5)], [_losses(straight)[s] for s in (4, 5)], atol=1e-5)


def test_state_shardings_are_derived_and_preserved(shards, tmp_path):
    """Output shardings of the jitted step equal its input shardings (run in an 8-device process)."""
    code = f"""
import jax, json
from flax_gpt.config_files import load_config
from flax_gpt.train.state import StateBuilder
from flax_gpt.train.inputs import open_splits
cfg = load_config({str(ROOT / 'configs' / 'tiny.yaml')!r}, {BASE!r} + ["data.shards_dir={shards}",
      "train.run_dir={tmp_path / 'r'}", "model.pad_vocab_to=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
t = StateBuilder(cfg, 10)
state = t.fresh()
train_rows, _ = open_splits(cfg)
from flax_gpt.data.loader import TrainLoader
batch = TrainLoader(train_rows, global_batch=8, seed=0, document_mask=False, packing="pack",
                    sharding=t.batch_sh).global_batch(0)
before = jax.tree.map(lambda x: x.sharding, state)
new, _ = t.step_fn(state, batch)
after = jax.tree.map(lambda x: x.sharding, new)
same = all(a.is_equivalent_to(b, x.ndim)
           for a, b, x in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(new)))
wte = new.params["wte"]["embedding"].sharding.spec
n_shards = len(new.params["wte"]["embedding"].addressable_shards[0].data)
print(json.dumps({{"same": same, "wte": list(wte), "n_shards": n_shards}}))
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same"] is True
    assert out["wte"] == ["tensor", "fsdp"]
    assert out["n_shards"] == 50304 // 2  # vocab rows split over tensor=2


def test_fsdp_keeps_the_batch_split_and_the_state_donated():
    """Compiled on 4 devices: FSDP (parameters split by width) must still split the activations by
    batch, so it needs no more temporaries or FLOPs per device than plain data parallelism (left to
    XLA's propagation it held 2.5x the temporaries and computed the whole batch on every device);
    and the state is donated (updated in place) in both."""
    code = f"""
import json
from flax_gpt.config_files import load_config
from flax_gpt.train.state import StateBuilder
out = {{}}
for mesh in (["mesh.data=4"], ["mesh.data=1", "mesh.fsdp=4"]):
    cfg = load_config({str(ROOT / 'configs' / 'tiny.yaml')!r}, mesh + ["train.batch_size=16", "data.seq_len=128",
                      "model.n_embd=128", "model.n_layer=2", "model.n_head=4", "model.pad_vocab_to=128"])
    b = StateBuilder(cfg, 10)
    c = b.step_fn.lower(b.abstract, b.abstract_batch()).compile()
    ma = c.memory_analysis()
    out[mesh[-1]] = [ma.temp_size_in_bytes, ma.alias_size_in_bytes, c.cost_analysis()["flops"]]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env(4), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (dp_temp, dp_alias, dp_flops), (fsdp_temp, fsdp_alias, fsdp_flops) = out["mesh.data=4"], out["mesh.fsdp=4"]
    assert fsdp_temp < 1.2 * dp_temp, out
    assert fsdp_flops < 1.02 * dp_flops, out
    assert dp_alias > 0 and fsdp_alias > 0, out  # params and optimizer state written in place


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(shards, tmp_path):
    common = [f"data.shards_dir={shards}", "train.steps=4", "model.embd_pdrop=0", "model.attn_pdrop=0",
              "model.resid_pdrop=0", "checkpoint.every=2"]
    assert _train_cli(tmp_path / "single", *common, devices=4).returncode == 0
    run = tmp_path / "multi"

    def launch(steps, *more):
        port = _free_port()
        procs = [
            _train_cli(run, *common, f"train.steps={steps}", *more, devices=2, wait=False,
                       extra_args=["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i)])
            for i in range(2)
        ]
        outs = [p.communicate(timeout=400) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err
        return outs

    launch(2)
    # resumes from the checkpoint both processes wrote at step 2; the export at the end is of the
    # parameters in memory, gathered from both processes, and is the last checkpoint's, byte for byte
    outs = launch(4, f"train.export_dir={tmp_path / 'exp'}")
    assert "resuming from checkpoint 2" in outs[0][0] and "exported to" in outs[0][0]
    a, b = _losses(tmp_path / "single"), _losses(run)
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "flax_gpt.cli", "export", str(run), "--out", str(tmp_path / "exp2")],
                       env=_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("exp", "exp2")]
    assert weights[0] == weights[1]


def _one_error_line(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs(shards, tmp_path):
    _one_error_line(_train_cli(tmp_path / "a", f"data.shards_dir={shards}", "mesh.data=3", devices=8),
                    "mesh", "8 are available")
    _one_error_line(_train_cli(tmp_path / "b", f"data.shards_dir={shards}", "mesh.tensor=2", devices=2),
                    "not divisible", "pad_vocab_to")
    _one_error_line(_train_cli(tmp_path / "c", f"data.shards_dir={shards}", "model.vocab_size=1000"),
                    "vocab")
    run = tmp_path / "d"
    assert _train_cli(run, f"data.shards_dir={shards}", "train.steps=2").returncode == 0
    _one_error_line(_train_cli(run, f"data.shards_dir={shards}", "train.steps=4", "model.n_embd=64"),
                    "model.n_embd=32", "new train.run_dir")


def test_corrupt_latest_checkpoint_falls_back(shards, tmp_path):
    run = tmp_path / "run"
    common = [f"data.shards_dir={shards}", "checkpoint.every=2", "checkpoint.keep=3"]
    assert _train_cli(run, *common, "train.steps=4").returncode == 0
    params_dir = run / "checkpoints" / "4" / "params"
    for f in params_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 8)
    r = _train_cli(run, *common, "train.steps=6")
    assert r.returncode == 0, r.stderr
    assert "checkpoint 4 is unreadable" in r.stdout + r.stderr and "resuming from checkpoint 2" in r.stdout


def test_bench_writes_the_contract_json(tmp_path, shards):
    out = tmp_path / "bench.json"
    r = _train_cli(tmp_path / "run", f"data.shards_dir={shards}", verb="bench",
                   extra_args=["--steps", "3", "--warmup", "1", "--baseline", "eager", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    for key in ("tokens_per_sec", "tokens_per_sec_per_device", "step_time_s", "compile_time_s", "flops_per_token",
                "mfu", "device_kind", "num_devices", "baseline"):
        assert key in got, key
    assert got["device_kind"] == "cpu" and got["num_devices"] == 1 and got["mfu"] is None  # CPUs have no peak
    assert len(got["step_times_s"]) == 3 and got["step_time_s"] == sorted(got["step_times_s"])[1]  # the median
    assert got["tokens_per_sec"] == pytest.approx(8 * 32 / got["step_time_s"])
    assert got["compile_time_s"] > 0 and got["flops_per_token"] > 0
    base = got["baseline"]
    assert base["tokens_per_sec"] > 0 and base["ratio"] == pytest.approx(got["tokens_per_sec"] / base["tokens_per_sec"])
    assert got["loop"]["tokens_per_sec"] > 0 and got["loop"]["ratio_to_bare_step"] > 0
