"""`model.remat`: each policy computes the same loss and gradients, keeps what it names for the
backward pass, and the booleans of older configs and run directories still load."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model_config
from jax._src.ad_checkpoint import saved_residuals  # what a backward pass keeps; no public equivalent

from flax_gpt.config_files import config_from_yaml, config_yaml, load_config
from flax_gpt.errors import ConfigError
from flax_gpt.model.gpt2 import GPT2, init_params
from flax_gpt.train.run_dir import RunDir, check_resume_compatible

B, T = 2, 32


def _setup(policy: str):
    cfg = tiny_model_config(attention="xla", remat=policy)  # the XLA path: its T x T residuals are named
    params = nn.unbox(init_params(cfg, jax.random.key(0), T))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return cfg, params, tokens


def _loss(params, cfg, tokens):
    logits = GPT2(cfg).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_a_policy_changes_memory_not_the_result(policy):
    cfg, params, tokens = _setup("none")
    want, want_g = jax.value_and_grad(_loss)(params, cfg, tokens)
    got, got_g = jax.value_and_grad(_loss)(params, dataclasses.replace(cfg, remat=policy), tokens)
    assert abs(float(got) - float(want)) <= 1e-6
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=1e-6)  # the same float32 ops, recomputed


def test_each_policy_keeps_what_it_names():
    kept = {}
    for policy in ("none", "minimal", "full"):
        cfg, params, tokens = _setup(policy)
        kept[policy] = [(tuple(a.shape), a.size * a.dtype.itemsize, how)
                        for a, how in saved_residuals(lambda p, c=cfg, t=tokens: _loss(p, c, t), params)]
    D, F = 64, 256
    probs = lambda p: [k for k in kept[p] if k[0][-2:] == (T, T)]  # attention's (T, T) arrays
    matmuls = lambda p: {k[0][-1] for k in kept[p] if "dot_general" in k[2] and k[0][:2] == (B, T)}
    # none keeps attention's probabilities; minimal and full recompute them
    assert probs("none") and not probs("minimal") and not probs("full")
    # minimal keeps every weight matmul's output (QKV 3D, attention projection D, MLP F and D); full none
    assert matmuls("minimal") == {3 * D, D, F} and not matmuls("full")
    total = {p: sum(k[1] for k in kept[p]) for p in kept}
    assert total["none"] > total["minimal"] > total["full"], total


@pytest.mark.parametrize("text, policy", [("true", "full"), ("false", "none"), ("yes", "full"), ("minimal", "minimal")])
def test_older_configs_booleans_read_as_policies(tmp_path, text, policy):
    assert load_config("configs/tiny.yaml", [f"model.remat={text}"]).model.remat == policy
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  preset: tiny\n  remat: {text}\n")
    assert load_config(str(path)).model.remat == policy


def test_a_run_saved_with_remat_false_resumes_with_any_policy(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = load_config("configs/tiny.yaml", [f"train.run_dir={run}"])
    saved = config_yaml(old).replace("remat: none", "remat: false")  # as runs before policies wrote it
    assert "remat: false" in saved
    (run / "config.yaml").write_text(saved)
    back = RunDir(run).config()
    assert back == old and back.model.remat == "none"
    for policy in ("minimal", "full"):  # remat changes how a run goes, not what it computes
        check_resume_compatible(back, old.replace(model={"remat": policy}))


def test_an_unknown_policy_names_the_choices():
    with pytest.raises(ConfigError, match="none, minimal, save_attention, full"):
        config_from_yaml("model:\n  remat: everything\n", "test")
    with pytest.raises(ConfigError, match="none, minimal, save_attention, full"):
        load_config(None, ["model.remat=2"])


def test_save_attention_keeps_the_splash_output_so_the_recomputed_block_skips_its_forward():
    """save_attention keeps what splash names (its output and softmax statistics, the logsumexp),
    so the backward pass never reruns the kernel's forward; full keeps only the inputs. Both give
    the gradients of no remat: the same float32 operations, the kernel's forward run again or not
    (here in Pallas' interpreter; the compiled TPU step's kernel count is in test_attention.py)."""
    from flax_gpt.model.attention import splash_heads_major
    from flax_gpt.model.gpt2 import REMAT_POLICIES

    b, h, t, k = 1, 2, 128, 64  # splash's smallest block is 128 tokens
    q, kk, v, w = (jax.random.normal(jax.random.key(i), (b, h, t, k)) for i in range(4))

    def loss(policy):
        def block(q, kk, v):
            return splash_heads_major(jnp.tanh(q), kk, v, interpret=True) * 2.0
        f = block if policy == "none" else jax.checkpoint(block, policy=REMAT_POLICIES[policy])
        return lambda q, kk, v: jnp.sum(f(q, kk, v) * w)

    kept = {p: [(tuple(a.shape), how) for a, how in saved_residuals(loss(p), q, kk, v)] for p in ("save_attention",
                                                                                                    "full")}
    # what each keeps beyond its arguments and constants (the kernel's mask tables, w)
    computed = {p: [s for s, how in kept[p] if "argument" not in how and "constant" not in how] for p in kept}
    assert sorted(computed["save_attention"]) == [(b, h, t), (b, h, t, k)], kept  # logsumexp, output
    assert computed["full"] == [], kept
    want = jax.grad(loss("none"), argnums=(0, 1, 2))(q, kk, v)
    for policy in ("save_attention", "full"):
        got = jax.grad(loss(policy), argnums=(0, 1, 2))(q, kk, v)
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a, c)
