"""`benchmarks/gpu_check.sh --smoke`: the GPU check's every step, on CPU at tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 1.5-3 minutes on 2 cores: two `flax-gpt bench` runs (each compiles twice) and generation
def test_gpu_check_smoke_runs_every_step_and_writes_its_json(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu_check_generate_smoke.json", "gpu_check_main_smoke.json", "gpu_check_pad_vocab_0_smoke.json",
                     "gpu_check_summary_smoke.json"]
    summary = json.loads((out / "gpu_check_summary_smoke.json").read_text())
    assert json.loads(r.stdout) == summary
    main = json.loads((out / "gpu_check_main_smoke.json").read_text())
    pad0 = json.loads((out / "gpu_check_pad_vocab_0_smoke.json").read_text())
    # the A/B really changed the setting it names, on the shapes --smoke asks for
    assert (main["config"]["vocab"], pad0["config"]["vocab"]) == (50304, 50257)
    assert (main["config"]["preset"], main["config"]["seq_len"], main["config"]["dtype"]) == ("tiny", 64, "float32")
    assert summary["ours"]["tokens_per_sec"] == main["tokens_per_sec"] > 0
    assert summary["pytorch_eager_tokens_per_sec"] > 0 and summary["torch_compile_tokens_per_sec"] is None
    assert summary["ab"]["attention_cudnn_tokens_per_sec"] == "skipped (CPU)"
    # which kernels ran, as the step chose them: the main run asks for XLA attention; a CPU runs
    # the chunked loss (the fused Pallas kernels are TPU-only)
    assert summary["kernels"] == main["kernels"] == {"attention": "xla", "loss": "chunked"}
    assert summary["generate"][0]["jax_new_tokens_per_s"] > 0
    assert "targets_met" not in summary  # a CPU has no peak FLOP/s: no MFU to judge
    assert not list((ROOT / "benchmarks" / "results").glob("gpu_check_*smoke*"))  # smoke figures stay out
