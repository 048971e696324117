"""Model parity with transformers' GPT2LMHeadModel, masks, causality, bf16, remat, vocab padding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import params_from_torch, tiny_model_config, torch_reference

from flax_gpt.model.gpt2 import GPT2, abstract_params, transpose_kernels

torch = pytest.importorskip("torch")


def _tokens(cfg, B=2, T=24, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


def _jax_loss(params, cfg, tokens):
    logits = GPT2(cfg).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("shape", ["tiny", pytest.param("distilgpt2", marks=pytest.mark.slow)])
def test_forward_loss_and_gradients_match_transformers(shape):
    if shape == "tiny":
        cfg = tiny_model_config()
    else:
        cfg = tiny_model_config(preset="distilgpt2", n_layer=6, n_embd=768, n_head=12, n_positions=1024)
    ref = torch_reference(cfg)
    params = params_from_torch(ref, cfg)
    tokens = _tokens(cfg, T=32 if shape == "tiny" else 16)

    ours = np.asarray(GPT2(cfg).apply({"params": params}, tokens))
    t_tokens = torch.from_numpy(tokens.astype(np.int64))
    out = ref(t_tokens, labels=t_tokens)
    assert np.max(np.abs(ours - out.logits.detach().numpy())) <= 1e-4

    loss, grads = jax.value_and_grad(_jax_loss)(params, cfg, tokens)
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    out.loss.backward()
    from flax_gpt.model.hf import to_hf_state_dict

    ours_g = to_hf_state_dict(grads, cfg)
    ref_g = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    assert set(ours_g) == set(ref_g) - {"lm_head.weight"}  # tied: lm_head is wte
    for name, g in ours_g.items():
        scale = np.max(np.abs(ref_g[name])) or 1.0
        assert np.max(np.abs(g - ref_g[name])) / scale <= 1e-4, name


def test_bf16_compute_close_to_fp32():
    cfg = tiny_model_config()
    params = params_from_torch(torch_reference(cfg), cfg)
    tokens = _tokens(cfg)
    f32 = GPT2(cfg).apply({"params": params}, tokens)
    b16 = GPT2(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, tokens)
    assert b16.dtype == jnp.float32  # logits always come out in float32 for the loss
    diff = float(jnp.max(jnp.abs(f32 - b16)))
    # Measured ~0.03 on this tiny model (logits of magnitude ~1); bf16 has 8 mantissa bits.
    assert 0 < diff < 0.1
    l32 = float(_jax_loss(params, cfg, tokens))
    l16 = float(_jax_loss(params, dataclasses.replace(cfg, dtype="bfloat16"), tokens))
    assert abs(l32 - l16) < 5e-3


def test_segment_mask_matches_running_documents_alone():
    cfg = tiny_model_config()
    params = params_from_torch(torch_reference(cfg), cfg)
    a, b = _tokens(cfg, B=1, T=10, seed=1)[0], _tokens(cfg, B=1, T=14, seed=2)[0]
    row = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(10), np.arange(14)])[None].astype(np.int32)
    segments = np.concatenate([np.full(10, 1), np.full(14, 2)])[None].astype(np.int32)
    model = GPT2(cfg)
    packed = np.asarray(model.apply({"params": params}, row, positions, segments))
    alone = np.asarray(model.apply({"params": params}, b[None]))
    assert np.max(np.abs(packed[0, 10:] - alone[0])) <= 1e-5
    # Without the mask the second document sees the first: the logits must differ.
    unmasked = np.asarray(model.apply({"params": params}, row, positions))
    assert np.max(np.abs(unmasked[0, 10:] - alone[0])) > 1e-3


def test_causality_future_tokens_do_not_change_the_past():
    cfg = tiny_model_config()
    params = params_from_torch(torch_reference(cfg), cfg)
    tokens = _tokens(cfg, B=1, T=20)
    changed = tokens.copy()
    changed[0, 12:] = (changed[0, 12:] + 7) % cfg.vocab_size
    model = GPT2(cfg)
    x, y = (np.asarray(model.apply({"params": params}, t)) for t in (tokens, changed))
    assert np.array_equal(x[0, :12], y[0, :12])
    assert not np.allclose(x[0, 12:], y[0, 12:])


def test_vocab_padding_never_predicts_padded_ids_and_keeps_logits():
    cfg = tiny_model_config()
    padded = dataclasses.replace(cfg, pad_vocab_to=128)
    assert padded.padded_vocab == 50304 and abstract_params(padded)["wte"]["embedding"].shape[0] == 50304
    ref = torch_reference(cfg)
    p_plain, p_pad = params_from_torch(ref, cfg), params_from_torch(ref, padded)
    tokens = _tokens(cfg)
    plain = np.asarray(GPT2(cfg).apply({"params": p_plain}, tokens))
    pad = np.asarray(GPT2(padded).apply({"params": p_pad}, tokens))
    assert pad.shape[-1] == 50304
    assert np.max(np.abs(pad[..., : cfg.vocab_size] - plain)) <= 1e-5
    assert np.all(pad[..., cfg.vocab_size:] < -1e29)
    assert int(np.max(np.argmax(pad, -1))) < cfg.vocab_size


def test_transposed_kernel_layout_gives_the_same_logits():
    cfg = tiny_model_config()
    params = params_from_torch(torch_reference(cfg), cfg)
    flipped = transpose_kernels(params)
    c_fc = params["h_0"]["mlp"]["c_fc"]["kernel"]
    assert flipped["h_0"]["mlp"]["c_fc"]["kernel"].shape == c_fc.shape[::-1]
    assert flipped["wte"]["embedding"].shape == params["wte"]["embedding"].shape  # only block kernels flip
    tokens = _tokens(cfg)
    want = np.asarray(GPT2(cfg).apply({"params": params}, tokens))
    got = np.asarray(GPT2(cfg, transposed_kernels=True).apply({"params": flipped}, tokens))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_remat_gives_the_same_gradients():
    cfg = tiny_model_config()
    params = params_from_torch(torch_reference(cfg), cfg)
    tokens = _tokens(cfg)
    g1 = jax.grad(_jax_loss)(params, cfg, tokens)
    g2 = jax.grad(_jax_loss)(params, dataclasses.replace(cfg, remat="full"), tokens)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_parameters_carry_logical_axes():
    from flax_gpt.sharding import RULES

    boxed = abstract_params(tiny_model_config(), boxed=True)
    import flax.linen as nn

    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    names = {a for s in specs for a in s}
    assert names <= {r[0] for r in RULES} and {"vocab", "embed", "mlp", "qkv"} <= names


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_rows_is_nn_embed_bit_for_bit_forward_and_backward(dtype):
    """embed_rows (rows gathered, then cast) computes what nn.Embed(dtype=...) computes (table
    cast, then gathered), and its gradient is the one autodiff gives nn.Embed, repeated ids
    included: the rows' cotangents added into a table of the compute dtype, then cast."""
    import flax.linen as nn

    from flax_gpt.model.gpt2 import embed_rows

    table = jax.random.normal(jax.random.key(0), (50, 16), jnp.float32)
    ids = jnp.asarray([[3, 7, 3, 49], [0, 3, 7, 7]], jnp.int32)
    w = jax.random.normal(jax.random.key(1), (2, 4, 16), jnp.float32).astype(dtype)
    embed = nn.Embed(50, 16, dtype=dtype)

    def plain(t):
        return jnp.sum((embed.apply({"params": {"embedding": t}}, ids) * w).astype(jnp.float32))

    def ours(t):
        return jnp.sum((embed_rows(t, ids, dtype) * w).astype(jnp.float32))

    want, want_g = jax.value_and_grad(plain)(table)
    got, got_g = jax.value_and_grad(ours)(table)
    assert embed_rows(table, ids, dtype).dtype == dtype
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_g, want_g)
