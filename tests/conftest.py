"""Shared fixtures: small reference GPT-2 models built locally (nothing is downloaded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARXIV_DIR = ROOT.parent / "shared" / "data" / "arxiv"
GCS_BUCKETS = ("flax-gpt-test", "forbidden-bucket")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The local Cloud Storage server's address is fixed now, before flax_gpt (and gcsfs) load, so the
# one standard setting reaches every library; the server itself starts only for tests that use it.
os.environ.setdefault("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")


@pytest.fixture(scope="session")
def gcs():
    """A real GCS server (gcp-storage-emulator) on 127.0.0.1 for the session: gs:// URLs of
    flax_gpt and of the libraries under it (gcsfs, TensorStore) all reach it."""
    pytest.importorskip("gcp_storage_emulator")
    url = os.environ["STORAGE_EMULATOR_HOST"]
    port = int(url.rsplit(":", 1)[1])
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), *GCS_BUCKETS],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the GCS emulator did not start")
    yield url
    proc.kill()
    proc.wait()


def tiny_model_config(**kw):
    from flax_gpt.config import ModelConfig

    base = dict(preset="tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=64,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    base.update(kw)
    return ModelConfig(**base)


def torch_reference(cfg, seed: int = 0):
    """A transformers GPT2LMHeadModel with cfg's shapes and seeded random weights (fp32, eval)."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions,
                        n_inner=cfg.n_inner or None, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(hf_cfg).eval()
    # Non-trivial LayerNorm params and biases so their mapping is actually exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def params_from_torch(model, cfg):
    from flax_gpt.model.gpt2 import abstract_params
    from flax_gpt.model.hf import from_hf_state_dict

    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return from_hf_state_dict(sd, cfg, abstract_params(cfg))


@pytest.fixture
def arxiv_sample():
    path = ARXIV_DIR / "arxiv_ml_sample500.csv"
    if not path.is_file():
        pytest.skip("shared arxiv corpus not present")
    return path


TRAINED_OVERRIDES = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=4", "model.n_positions=64", "data.seq_len=32",
    "data.synthetic_docs=120", "train.batch_size=4", "train.progress=false", "optim.warmup_steps=1",
    "model.embd_pdrop=0", "model.attn_pdrop=0", "model.resid_pdrop=0",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One small trained run shared by the tests that only read it (copy it before changing it):
    `shards/`, `run/` (4 steps, checkpoints 2 and 4, evaluated at both) and `export/` (its HF export)."""
    root = tmp_path_factory.mktemp("trained")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    train = [sys.executable, "-m", "flax_gpt.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *TRAINED_OVERRIDES,
             "data.shards_dir=shards", "train.run_dir=run", "train.steps=4", "train.eval_every=2",
             "checkpoint.every=2"]
    r = subprocess.run(train, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "flax_gpt.cli", "export", "run", "--out", "export"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return root
