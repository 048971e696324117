"""Shared fixtures: small reference GPT-2 models built locally (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARXIV_DIR = ROOT.parent / "shared" / "data" / "arxiv"


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
    from flax_gpt.model.hf import from_hf_state_dict
    from flax_gpt.model.gpt2 import abstract_params

    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return from_hf_state_dict(sd, cfg, abstract_params(cfg))


@pytest.fixture
def arxiv_sample():
    path = ARXIV_DIR / "arxiv_ml_sample500.csv"
    if not path.is_file():
        pytest.skip("shared arxiv corpus not present")
    return path
