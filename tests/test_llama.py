"""The Llama family against transformers' LlamaForCausalLM on tiny random configs, tied and untied:
logits (with and without the document mask), import -> export bit for bit, the KV cache and
greedy generation, the chunked loss and its gradients, a short training run, remat, the decay rule,
logical axes, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jcore
from safetensors.numpy import save_file

from flax_gpt.model import llama
from flax_gpt.model.llama import Llama, abstract_params, decay_mask, init_cache
from flax_gpt.model.llama_hf import (
    from_hf_state_dict,
    hf_config_dict,
    load_hf,
    model_config_from_hf,
    preset_of,
    to_hf_state_dict,
)
from flax_gpt.model.loss import cross_entropy_sums
from flax_gpt.sharding import RULES
from flax_gpt.train import optim

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EPS32 = float(np.finfo(np.float32).eps)
LOGIT_TOL = 1e-4  # float32 parity bound of the GPT-2 family, kept for this one


@functools.cache
def _reference(tied: bool):
    """(HF model, our config, our params): 2 layers, width 64, 4 query heads sharing 2 key/value
    heads, a rotary base other than the default, RMSNorm scales moved off 1 so their mapping counts."""
    torch.manual_seed(0 if tied else 1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128 if tied else 256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = model_config_from_hf(hf_cfg.to_dict(), attention="xla")
    return model, cfg, from_hf_state_dict(_numpy_sd(model), cfg, abstract_params(cfg))


def _numpy_sd(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def ref(request):
    return _reference(request.param)


def _tokens(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def test_logits_match_transformers(ref):
    model, cfg, params = ref
    tokens = _tokens(cfg, 2, 40)
    ours = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    assert ours.shape == (2, 40, cfg.vocab_size)
    assert np.max(np.abs(ours - _hf_logits(model, tokens))) <= LOGIT_TOL


def test_document_mask_matches_each_document_alone(ref):
    model, cfg, params = ref
    lengths = [[5, 11, 8], [13, 11]]
    docs = [[_tokens(cfg, 1, n, seed=10 * r + i)[0] for i, n in enumerate(row)] for r, row in enumerate(lengths)]
    tokens = np.stack([np.concatenate(row) for row in docs])
    positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in lengths]).astype(np.int32)
    segments = np.stack([np.concatenate([np.full(n, i + 1) for i, n in enumerate(row)])
                         for row in lengths]).astype(np.int32)
    packed = np.asarray(Llama(cfg).apply({"params": params}, tokens, positions, segments))
    unmasked = np.asarray(Llama(cfg).apply({"params": params}, tokens, positions))
    for r, row in enumerate(docs):
        start = 0
        for doc in row:
            alone = _hf_logits(model, doc[None])[0]
            assert np.max(np.abs(packed[r, start:start + len(doc)] - alone)) <= LOGIT_TOL
            if start:  # without the mask a later document sees the ones before it
                assert np.max(np.abs(unmasked[r, start:start + len(doc)] - alone)) > 1e-3
            start += len(doc)


def test_import_export_round_trip_is_bit_exact(ref):
    model, cfg, params = ref
    sd = _numpy_sd(model)
    back = to_hf_state_dict(params, cfg)
    tied_away = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(back) == set(sd) - tied_away
    for name, arr in back.items():
        assert arr.dtype == sd[name].dtype and np.array_equal(arr, sd[name]), name
    # Vocab padding is added on import (zero rows) and stripped on export.
    padded = dataclasses.replace(cfg, pad_vocab_to=96)
    p_pad = from_hf_state_dict(sd, padded, abstract_params(padded))
    assert llama.head_embedding(p_pad, padded).shape[0] == padded.padded_vocab > cfg.vocab_size
    assert all(np.array_equal(a, sd[n]) for n, a in to_hf_state_dict(p_pad, padded).items())
    # The config, through transformers' own LlamaConfig and back.
    hf_dict = hf_config_dict(cfg, bos_id=None, eos_id=None)
    assert model_config_from_hf(transformers.LlamaConfig(**hf_dict).to_dict(), attention="xla") == cfg


def test_exported_folder_loads_in_transformers_and_back(ref, tmp_path):
    model, cfg, params = ref
    save_file(to_hf_state_dict(params, cfg), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, bos_id=None, eos_id=None)))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings == cfg.tie_word_embeddings
    tokens = _tokens(cfg, 2, 30, seed=3)
    assert np.array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))
    cfg_back, p_back = load_hf(str(tmp_path), abstract_params, attention="xla")
    assert cfg_back == cfg
    assert jax.tree.all(jax.tree.map(np.array_equal, p_back, jax.tree.map(np.asarray, params)))


def test_cached_decode_matches_the_full_forward(ref):
    _, cfg, params = ref
    B, T, P = 2, 20, 12  # prefill P tokens, then decode one at a time into T + 4 slots
    tokens = _tokens(cfg, B, T, seed=4)
    full = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    kv_valid = jnp.ones((B, T + 4), bool)
    run = jax.jit(lambda tok, pos, cache, index: Llama(cfg).apply(
        {"params": params}, tok, pos, cache=cache, cache_index=index, kv_valid=kv_valid))
    logits, cache = run(tokens[:, :P], jnp.arange(P)[None], init_cache(cfg, B, T + 4), 0)
    assert cache[0]["k"].shape == (B, cfg.kv_heads, cfg.head_size, T + 4)  # G heads cached, not H
    got = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = run(tokens[:, t:t + 1], jnp.full((B, 1), t), cache, t)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)


def _greedy(params, cfg, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy decoding as generate.py runs it: prompts left-padded to one length T, per-row positions
    from each prompt's first token, pad slots hidden by kv_valid, kernels read transposed."""
    B, T = len(prompts), max(map(len, prompts))
    lens = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
    kv_valid = jnp.arange(T + n_new)[None] >= (T - lens)[:, None]
    positions = jnp.maximum(jnp.arange(T)[None] - (T - lens)[:, None], 0)
    dparams = llama.decoding_params(params, cfg)
    head = dparams.pop("head")

    @jax.jit
    def step(tok, pos, cache, index):
        h, cache = Llama(cfg, transposed_kernels=True).apply(
            {"params": dparams}, tok, pos, cache=cache, cache_index=index, kv_valid=kv_valid, method=Llama.hidden)
        return jnp.argmax(h[:, -1] @ head, axis=-1).astype(jnp.int32), cache

    tok, cache = step(tokens, positions, init_cache(cfg, B, T + n_new), 0)
    out = [tok]
    for i in range(1, n_new):
        tok, cache = step(tok[:, None], jnp.asarray(lens + i - 1)[:, None], cache, T + i - 1)
        out.append(tok)
    return np.stack(out, axis=1).tolist()


def test_greedy_generation_matches_transformers(ref):
    model, cfg, params = ref
    prompts = [_tokens(cfg, 1, n, seed=20 + n)[0].tolist() for n in (3, 9, 14)]
    ours = _greedy(params, cfg, prompts, n_new=12)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  pad_token_id=0)
        assert got == want[0, len(prompt):].tolist()


def _hidden_and_head(module: Llama, tokens):
    h, _ = module.hidden(tokens)
    return h, module.head()


def _loss(params, cfg, inputs, targets):
    h, head = Llama(cfg).apply({"params": params}, inputs, method=_hidden_and_head)
    total, count = cross_entropy_sums(h, head, targets, jnp.ones(targets.shape), vocab_size=cfg.vocab_size)
    return total / count


def test_loss_and_gradients_match_transformers(ref):
    model, cfg, params = ref
    tokens = _tokens(cfg, 2, 17, seed=5)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss, grads = jax.value_and_grad(_loss)(params, cfg, inputs, targets)
    model.zero_grad()
    out = model(torch.from_numpy(tokens.astype(np.int64)), labels=torch.from_numpy(tokens.astype(np.int64)))
    out.loss.backward()
    # A token's NLL, logsumexp(z) - z_target, moves by at most 2 max|dz| when the logits z move by
    # dz, so the forward gap d bounds the loss gap by 2d. Rounding adds at most V * eps (relative)
    # to each logsumexp's sum of V terms and N * eps to the mean of N tokens (Higham's gamma_n,
    # worst-case sequential bounds).
    d = float(np.max(np.abs(np.asarray(Llama(cfg).apply({"params": params}, inputs))
                            - out.logits.detach().numpy()[:, :-1])))
    n_tokens = targets.size
    tol = 2 * d + (cfg.vocab_size + n_tokens) * EPS32 * out.loss.item()
    assert abs(float(loss) - out.loss.item()) <= tol
    ours = to_hf_state_dict(grads, cfg)
    theirs = {n: p.grad.numpy() for n, p in model.named_parameters()}  # a tied lm_head is embed_tokens
    assert set(ours) == set(theirs)
    for name, g in ours.items():
        assert np.all(np.isfinite(g)), name
        scale = np.max(np.abs(theirs[name]))
        assert np.max(np.abs(g - theirs[name])) <= 1e-4 * scale, name


def test_a_short_training_run_lowers_the_loss(ref):
    _, cfg, _ = ref
    params = nn.unbox(llama.init_params(cfg, jax.random.key(0), 16))
    tokens = _tokens(cfg, 4, 17, seed=6)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = optax.adamw(1e-2, weight_decay=0.01, mask=decay_mask)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_loss)(params, cfg, inputs, targets)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.1  # a fresh model guesses uniformly
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_changes_memory_not_the_result(policy):
    _, cfg, params = _reference(True)
    tokens = _tokens(cfg, 2, 17, seed=7)
    want, want_g = jax.value_and_grad(_loss)(params, cfg, tokens[:, :-1], tokens[:, 1:])
    got, got_g = jax.value_and_grad(_loss)(params, dataclasses.replace(cfg, remat=policy), tokens[:, :-1],
                                           tokens[:, 1:])
    assert abs(float(got) - float(want)) <= 1e-6
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=1e-6)  # the same float32 ops, recomputed


def test_bf16_compute_keeps_float32_parameters_and_logits(ref):
    _, cfg, params = ref
    tokens = _tokens(cfg, 2, 24, seed=8)
    f32 = Llama(cfg).apply({"params": params}, tokens)
    b16 = Llama(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, tokens)
    assert b16.dtype == jnp.float32
    assert 0 < float(jnp.max(jnp.abs(f32 - b16))) < 0.1  # bf16 has 8 mantissa bits; logits are ~1


def test_decay_rule_and_logical_axes(ref):
    _, cfg, params = ref
    for decay_embeddings in (True, False):
        mask = decay_mask(params, decay_embeddings=decay_embeddings)
        flat = {jax.tree_util.keystr(p, simple=True, separator="."): v
                for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
        for path, decays in flat.items():
            leaf = path.rsplit(".", 1)[1]
            assert decays == {"kernel": True, "scale": False, "embedding": decay_embeddings}[leaf], path
        assert mask == optim.decay_mask(params, decay_embeddings=decay_embeddings)  # one rule for both families
    specs = jax.tree.leaves(nn.get_partition_spec(abstract_params(cfg, boxed=True)),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(len(s) in (1, 2) for s in specs)
    assert {a for s in specs for a in s} <= {name for name, _ in RULES}


def test_parameter_counts_match_transformers(ref):
    model, cfg, params = ref
    assert llama.param_count(cfg) == model.num_parameters() == sum(a.size for a in jax.tree.leaves(params))
    known = {"smollm2-135m": 134_515_008, "tinyllama-1.1b": 1_100_048_384}
    for name, count in known.items():
        pcfg = llama.LlamaConfig(**llama.LLAMA_PRESETS[name])
        assert model_config_from_hf(hf_config_dict(pcfg, bos_id=0, eos_id=0)) == pcfg and preset_of(pcfg) == name
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(pcfg, bos_id=0, eos_id=0)))
        shapes = abstract_params(pcfg)
        assert llama.param_count(pcfg) == hf.num_parameters() == sum(a.size for a in jax.tree.leaves(shapes)) == count


def _dot_flops(jaxpr) -> int:
    """2 * multiply-adds of every dot_general in a jaxpr, nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += _dot_flops(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += _dot_flops(sub)
    return total


def test_flops_per_token_counts_the_matmuls_the_model_runs(ref):
    _, cfg, params = ref
    T = 32
    jaxpr = jax.make_jaxpr(lambda p, t: Llama(cfg).apply({"params": p}, t))(params, jnp.zeros((1, T), jnp.int32))
    forward = _dot_flops(jaxpr.jaxpr) / T  # per token: the weight matmuls, the head and attention
    norms = (2 * cfg.n_layer + 1) * cfg.n_embd  # in N by convention (Kaplan), but no matmul
    assert llama.flops_per_token(cfg, T) == 3 * forward + 6 * norms
