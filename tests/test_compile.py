"""`flax-gpt compile`: the train step compiled for Cloud TPU slices on this CPU host (libtpu as a
compiler only), its one-line errors, the largest-batch search, and `train.profile_steps`.

The TPU compiles need a libtpu.so: FLAX_GPT_TEST_LIBTPU names it (`.ci/run` installs libtpu into a
side folder; it is never installed into the venv, where it would print warnings at every jax
import). The tests that need it skip when it is not set.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flax_gpt.bench.max_batch import search_max_batch
from flax_gpt.bench.tpu_compile import ACCELERATORS, GiB, resolve
from flax_gpt.config_files import load_config
from flax_gpt.errors import ConfigError
from flax_gpt.model.loss_kernel import token_block

ROOT = Path(__file__).resolve().parents[1]
LIBTPU = os.environ.get("FLAX_GPT_TEST_LIBTPU", "")
needs_libtpu = pytest.mark.skipif(not os.path.isfile(LIBTPU), reason="FLAX_GPT_TEST_LIBTPU (a libtpu.so) not set")
CONTRACT = {"topology", "chips", "hosts", "device_kind", "mesh", "batch_size", "seq_len", "hbm_per_device_bytes",
            "hbm_capacity_bytes", "fits", "flops_per_device_step_xla", "flops_per_device_step_formula",
            "flops_per_device_step_used", "flops_used", "bytes_accessed_per_device_step_used",
            "bytes_accessed_source", "est_step_time_s", "est_tokens_per_sec", "est_mfu", "compile_time_s"}


def cli(*args, cwd: Path = ROOT, libtpu: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if libtpu:
        env["TPU_LIBRARY_PATH"] = LIBTPU
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def hbm_total_gib(res: dict) -> float:
    return res["hbm_per_device_bytes"]["total"] / GiB


PROGRESS = re.compile(r"compile \[ *\d+\.\d s\]: .+")


def one_line_error(r, *needles, after_progress: bool = False) -> str:
    """Exit 2 and one `error:` line on stderr; `after_progress`: after the compile's progress lines
    (a config compiled before the error was known), else alone (refused before anything ran)."""
    *before, last = r.stderr.strip().splitlines() or [""]
    assert r.returncode == 2, r.stderr
    assert last.startswith("error: "), r.stderr
    assert all(PROGRESS.fullmatch(line) for line in before) if after_progress else not before, r.stderr
    for n in needles:
        assert n in last, last
    return last


@needs_libtpu
@pytest.mark.parametrize("topology, chips, hosts, kind", [("v5e:2x2", 4, 1, "TPU v5 lite"),
                                                          ("v4:2x2x2", 8, 2, "TPU v4")])
def test_tiny_compiles_for_a_slice_and_reports_the_contract(tmp_path, topology, chips, hosts, kind):
    out = tmp_path / "plan.json"
    r = cli("compile", "configs/tiny.yaml", "--topology", topology, "--out", out)
    assert r.returncode == 0, r.stderr
    # stderr is the progress and nothing else (libtpu's notices about a missing TPU are silenced):
    # a line as each phase begins, with the seconds since the start, the last one the verdict
    lines = r.stderr.strip().splitlines()
    assert all(PROGRESS.fullmatch(line) for line in lines), r.stderr
    phases = ("abstract state built", "lowering the train step", "compiling with XLA:TPU", "analysing", "fits")
    assert [next(i for i, line in enumerate(lines) if p in line) for p in phases] == sorted(
        next(i for i, line in enumerate(lines) if p in line) for p in phases), r.stderr
    elapsed = [float(re.search(r"\[ *([\d.]+) s\]", line).group(1)) for line in lines]
    assert elapsed == sorted(elapsed)
    res = json.loads(r.stdout)
    assert CONTRACT <= set(res)
    assert json.loads(out.read_text()) == res
    assert (res["topology"], res["chips"], res["hosts"], res["device_kind"]) == (topology, chips, hosts, kind)
    assert math.prod(res["mesh"].values()) == chips and res["mesh"]["data"] == chips  # mesh.data=-1 filled it
    assert (res["batch_size"], res["seq_len"]) == (8, 64)
    hbm = res["hbm_per_device_bytes"]
    assert hbm["params"] > 0 and hbm["opt_state"] > hbm["params"]  # AdamW: two moments per parameter
    assert hbm["total"] > hbm["params"] + hbm["opt_state"] + hbm["temp"] / 2
    # the compiler's budget per device, not a guess: 15.75 GiB on v5e, 30.75 GiB on v4 (megacore)
    assert res["hbm_capacity_bytes"] == int((15.75 if kind == "TPU v5 lite" else 30.75) * GiB)
    assert res["fits"] is True
    assert f"{hbm_total_gib(res):.2f} of {res['hbm_capacity_bytes'] / GiB:.2f} GiB per device, fits" in lines[-1]
    # XLA counts softmax, LayerNorm and the optimizer too, which are large next to tiny's matmuls,
    # and the fused loss kernels' recomputed logits, 4 N V D more than the model's 6 N V D, where
    # a device's N tokens tile into them (128 on v5e:2x2; 64 on the v4 slice: the chunked loop)
    model, n = load_config(str(ROOT / "configs" / "tiny.yaml")).model, 8 * 64 // chips
    recompute = 4 * n * model.padded_vocab * model.n_embd if token_block(n) else 0
    ratio = (res["flops_per_device_step_xla"] - recompute) / res["flops_per_device_step_formula"]
    assert 0.95 < ratio < 1.4, ratio
    assert res["est_tokens_per_sec"] == pytest.approx(8 * 64 / res["est_step_time_s"])
    assert 0 < res["est_mfu"] < 1
    # the estimate is the roofline of the figures it says it used, never fewer FLOPs than the model's
    used = res["flops_per_device_step_used"]
    assert used == max(res["flops_per_device_step_xla"], res["flops_per_device_step_formula"])
    assert res["flops_used"] == ("xla" if used == res["flops_per_device_step_xla"] else "formula")
    assert res["bytes_accessed_per_device_step_used"] >= res["bytes_accessed_per_device_step_xla"]
    assert res["est_step_time_s"] == pytest.approx(max(used / res["peak_flops_per_device"],
                                                       res["bytes_accessed_per_device_step_used"]
                                                       / res["hbm_bandwidth_bytes_per_s"]))


@needs_libtpu
@pytest.mark.parametrize("overrides, needles", [
    (["mesh.data=3"], ("3 devices", "4 are available")),
    (["mesh.data=1", "mesh.tensor=4"], ("wte", "not divisible", "pad_vocab_to")),
    (["train.batch_size=6"], ("micro-batch 6", "batch shards")),
])
def test_sharding_mistakes_are_one_line(overrides, needles):
    one_line_error(cli("compile", "configs/tiny.yaml", *overrides, "--topology", "v5e-4"), *needles)


@needs_libtpu
def test_a_config_that_does_not_fit_prints_its_json_and_says_by_how_much():
    # 6 x 4096-wide layers + the 50257 x 4096 embedding: 1.4B parameters in fp32 + AdamW = 15.8 GiB per
    # device before activations, over v5e's 15.75 whatever the loss and attention kernels save
    r = cli("compile", "configs/tiny.yaml", "model.n_layer=6", "model.n_embd=4096", "model.n_head=32",
            "train.batch_size=64", "--topology", "v5e-4")
    line = one_line_error(r, "does not fit", "GiB over", "--find-max-batch", "mesh.fsdp", "model.remat",
                          after_progress=True)
    assert "GiB per device, does not fit" in r.stderr.splitlines()[-2]  # the verdict, then what to change
    res = json.loads(r.stdout)
    assert res["fits"] is False and res["hbm_per_device_bytes"]["total"] > res["hbm_capacity_bytes"]
    assert f"{(res['hbm_per_device_bytes']['total'] - res['hbm_capacity_bytes']) / GiB:.2f} GiB over" in line


def test_unknown_topology_lists_the_known_ones():
    line = one_line_error(cli("compile", "configs/tiny.yaml", "--topology", "v9-8", libtpu=False), "v9-8")
    for name in ("v5e-8", "v4-32", "v5p-128", "v6e-16", "vX:AxB"):
        assert name in line


def test_without_libtpu_it_names_the_extra():
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed in this environment")
    one_line_error(cli("compile", "configs/tiny.yaml", "--topology", "v5e-4", libtpu=False), 'pip install -e ".[tpu]"')


def test_names_resolve_to_one_table():
    assert resolve("v5litepod-8") == resolve("v5e-8") == resolve("v5e:2x4") == \
        ("v5e", "v5e:2x4", {"chips_per_host_bounds": [2, 4, 1]})  # a single 8-chip host
    assert resolve("v4-8") == resolve("v4:2x2") == ("v4", "v4:2x2x1", {"chip_config_name": "megacore"})
    assert resolve("v4:8x8x16")[2] == {"chip_config_name": "megacore"}  # never legacy (2 devices per chip)
    for name, (shape, _) in ACCELERATORS.items():
        gen, n = name.split("-")
        chips = math.prod(int(x) for x in shape.split(":")[1].split("x"))
        assert chips == (int(n) // 2 if gen in ("v4", "v5p") else int(n)), name  # v4/v5p names count cores
    with pytest.raises(ConfigError, match="known: v5e-1"):
        resolve("v5e-3")


def fake_probe(base: float, per_seq: float, capacity: float, *, floor: float = 0.0, remat_from: int | None = None,
               interrupt_at: int | None = None):
    """compile_step results from a memory model: base + per_seq * batch (at least `floor`), with
    FLOPs 10% over linear from `remat_from` on (the compiler recomputing to fit). Far over the
    capacity the compiler gives up, and its message overstates what it needs (as XLA:TPU's does).
    The compile after `interrupt_at` of them is stopped by Ctrl-C."""
    seen = []

    def probe(batch: int) -> dict:
        if interrupt_at is not None and len(seen) == interrupt_at:
            raise KeyboardInterrupt
        seen.append(batch)
        total = max(floor, base + per_seq * batch)
        xla = 1e9 * batch * (1.1 if remat_from and batch >= remat_from else 1.0)
        fits = total <= capacity or bool(remat_from and batch >= remat_from and batch < 2 * remat_from)
        compiled = fits or total < 1.1 * capacity
        return {"batch_size": batch, "fits": fits, "compiled": compiled, "compile_time_s": 1.0,
                "flops_per_device_step_xla": xla if compiled else None,
                "hbm_per_device_bytes": {"total": min(total, capacity) if fits else total * (1 if compiled else 1.5)}}
    return probe, seen


@pytest.mark.parametrize("kw, start, unit, expected, next_is", [
    (dict(base=2.0, per_seq=0.2, capacity=16.0), 32, 4, 68, "does not fit"),  # the line meets capacity at 70
    (dict(base=2.0, per_seq=0.2, capacity=16.0, floor=6.0), 8, 8, 64, "does not fit"),  # a flat floor hides the slope
    (dict(base=2.0, per_seq=0.2, capacity=16.0, remat_from=72), 32, 8, 64, "fits only by recomputing"),
    (dict(base=2.0, per_seq=0.2, capacity=16.0, remat_from=56), 16, 8, 48, "fits only by recomputing"),
    (dict(base=20.0, per_seq=0.2, capacity=16.0), 32, 4, 0, "does not fit"),  # params alone do not fit
    (dict(base=2.0, per_seq=1.0, capacity=16.0), 64, 4, 12, "does not fit"),  # the config's batch is too big
])
def test_max_batch_search_proves_the_largest_multiple_that_fits(kw, start, unit, expected, next_is):
    probe, seen = fake_probe(**kw)
    lines = []
    found = search_max_batch(probe, start, unit, kw["capacity"], max_compiles=10, say=lines.append)
    assert found["max_batch"] == expected, seen
    assert all(b % unit == 0 for b in seen) and len(seen) == len(set(seen)) == found["compiles"] <= 10
    # the proof: a clean fit at the answer, compiled, and the next multiple compiled and refused
    results = found["results"]
    assert found["exact"] and found["stopped"] is None
    assert found["proof"] == {"fits": expected or None, "next": expected + unit, "next_is": next_is}
    if expected:
        assert results[expected]["fits"] and not found["recomputes"][expected]
    assert not results[expected + unit]["fits"] or found["recomputes"][expected + unit]
    # one progress line per compile, in order: its batch, its memory, its verdict and its time
    assert len(lines) == len(seen), lines
    for batch, line in zip(seen, lines):
        r = results[batch]
        gib = r["hbm_per_device_bytes"]["total"] / GiB
        assert line.startswith(f"batch {batch}: {gib:.2f} of {kw['capacity'] / GiB:.2f} GiB per device, "), line
        assert line.endswith("(1.0 s)"), line
        verdict = line.split("GiB per device, ")[1]
        assert verdict.startswith("fits") == r["fits"], line
        # a batch the search refused although it fitted is one the compiler fitted by recomputing
        refused = r["fits"] and batch > found["max_batch"]
        assert ("recomputing" in verdict) == refused, (line, found["max_batch"])


@pytest.mark.parametrize("limit, stopped", [(dict(max_compiles=3), "max_compiles"),
                                            (dict(time_budget_s=3.5), "time_budget"),  # 1 s a compile
                                            (dict(interrupt_at=3), "interrupted")])
def test_a_search_stopped_early_returns_the_largest_batch_proven_to_fit(limit, stopped):
    probe, seen = fake_probe(2.0, 0.2, 16.0, interrupt_at=limit.pop("interrupt_at", None))
    lines = []
    try:
        found = search_max_batch(probe, 8, 4, 16.0, **{"max_compiles": 10, **limit}, say=lines.append)
    except KeyboardInterrupt:  # pytest would stop the whole session on it
        pytest.fail("Ctrl-C went through the search")
    # 8 and 16 fit, then the line's answer 68 fits too; 72 was never compiled, so 68 is not proven largest
    assert seen == [8, 16, 68] and len(lines) == 3
    assert (found["max_batch"], found["exact"], found["stopped"], found["proof"]) == (68, False, stopped, None)
    assert found["results"][68]["fits"] and not found["recomputes"][68]


def test_ctrl_c_during_the_search_prints_the_json_so_far_and_exits_130(monkeypatch, capsys):
    import signal

    from flax_gpt import cli
    from flax_gpt.bench import tpu_compile

    probe, seen = fake_probe(2.0 * GiB, 0.2 * GiB, 15.75 * GiB, interrupt_at=3)

    def compile_step(cfg, gen, devices, *, say=None):
        r = probe(cfg.train.batch_size)
        r["hbm_per_device_bytes"].update(params=GiB // 4, opt_state=GiB // 2, temp=GiB)
        return {**r, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "hbm_capacity_bytes": int(15.75 * GiB)}

    monkeypatch.setattr(tpu_compile, "topology_devices", lambda topology: ("v5e", "v5e:2x4", []))
    monkeypatch.setattr(tpu_compile, "compile_step", compile_step)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        rc = cli.main(["compile", "configs/tiny.yaml", "--topology", "v5e-8", "--find-max-batch"])
    except KeyboardInterrupt:  # pytest would stop the whole session on it
        pytest.fail("Ctrl-C went through the search")
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert rc == 130 and res["interrupted"] is True
    assert seen == [8, 16, 64] and res["max_batch"] == 64  # unit 8: the line's 68 rounds down to 64
    assert res["max_batch_search"]["exact"] is False and res["max_batch_search"]["stopped"] == "interrupted"
    assert err.strip().splitlines()[-1] == "interrupted; the largest batch proven to fit so far is 64 (in the JSON)"


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    from jax.profiler import ProfileData

    run = tmp_path / "run"
    r = cli("train", "configs/tiny.yaml", "train.steps=6", "train.eval_every=0", "checkpoint.every=0",
            "train.progress=false", "data.synthetic_docs=200", f"data.shards_dir={tmp_path}/shards",
            f"train.run_dir={run}", "train.profile_steps=2:4", libtpu=False)
    assert r.returncode == 0, r.stderr
    traces = list((run / "profile").rglob("*.xplane.pb"))  # what TensorBoard's profile plugin reads
    assert len(traces) == 1, list((run / "profile").rglob("*"))
    calls = [(ev.start_ns, ev.start_ns + ev.duration_ns) for plane in ProfileData.from_file(str(traces[0])).planes
             for line in plane.lines for ev in line.events if ev.name == "PjitFunction(train_step)"]
    # each call shows up twice, nested; the outer ones are the steps: 3 and 4 of 6
    outer = [c for i, c in enumerate(calls) if not any(j != i and o[0] <= c[0] and c[1] <= o[1]
                                                       for j, o in enumerate(calls))]
    assert len(outer) == 2, calls


def test_not_fitting_suggests_only_what_the_config_does_not_do_yet():
    from flax_gpt.bench.tpu_compile import fit_problem

    hbm = {"params": GiB, "opt_state": 2 * GiB, "temp": 30 * GiB, "total": 33 * GiB}
    base = {"fits": False, "hbm_per_device_bytes": hbm, "hbm_capacity_bytes": 16 * GiB, "topology": "v5e-8"}
    line = fit_problem({**base, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "remat": "none"})
    assert "17.00 GiB over" in line and "mesh.fsdp" in line and "model.remat=save_attention" in line
    assert "model.remat=full" in fit_problem({**base, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "remat": "minimal"})
    line = fit_problem({**base, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "remat": "full"})
    assert "mesh.fsdp" not in line and "model.remat" not in line and "--find-max-batch" in line
    assert fit_problem({**base, "fits": True}) is None
