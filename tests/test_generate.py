"""The KV-cache sampler against transformers and against itself without a cache."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import params_from_torch, tiny_model_config, torch_reference

from flax_gpt.config import ConfigError
from flax_gpt.generate import (
    compiled_sampler,
    decode_step,
    decoding_params,
    filter_top_p,
    generate_tokens,
    left_pad,
    prefill,
    sample_logits,
)
from flax_gpt.model.gpt2 import GPT2

EOS = 50256
PROMPT_LENS = (1, 5, 13, 24)  # different lengths in one batch: exercises padding, positions, masks


def lively_reference(cfg):
    """torch_reference with attention/MLP weights scaled up: at GPT-2's init scale a random model's
    greedy output repeats one token whatever the context, which would hide mask/position bugs."""
    import torch

    model = torch_reference(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and (".attn." in name or ".mlp." in name):
                p.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_model_config()
    model = lively_reference(cfg)
    return cfg, model, params_from_torch(model, cfg)


def _prompts(lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, EOS, n).tolist() for n in lens]


def _hf_greedy(model, prompt, max_new_tokens):
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def test_greedy_matches_transformers_token_for_token(reference):
    cfg, model, params = reference
    prompts = _prompts()
    ours = generate_tokens(params, cfg, prompts, max_new_tokens=20, greedy=True)
    theirs = [_hf_greedy(model, p, 20) for p in prompts]  # each prompt alone: no padding at all
    assert ours == theirs
    assert all(len(set(row)) > 5 for row in ours)  # the comparison is not between constant rows


def test_kv_cache_logits_match_recomputing_the_sequence(reference):
    cfg, _, params = reference
    prompts, steps = _prompts(), 12
    follow = np.random.default_rng(1).integers(0, EOS, (len(prompts), steps)).astype(np.int32)
    T, S = 32, 32 + steps
    tokens, lens = left_pad(prompts, T, EOS)
    run_prefill = jax.jit(prefill, static_argnames=("cfg", "cache_len"))
    run_decode = jax.jit(decode_step, static_argnames=("cfg",))
    dparams = decoding_params(params, cfg)
    logits, cache, kv_valid = run_prefill(dparams, cfg=cfg, tokens=tokens, prompt_lens=lens, cache_len=S)
    cached = [np.asarray(logits)]
    for i in range(steps - 1):
        logits, cache = run_decode(dparams, cfg, jnp.asarray(follow[:, i]), jnp.asarray(lens + i), cache, T + i,
                                   kv_valid)
        cached.append(np.asarray(logits))
    # Without a cache: each row's whole sequence from position 0, right-padded to one length (a
    # causal model's logits at a position never depend on what comes after it).
    seqs = [p + follow[b, : steps - 1].tolist() for b, p in enumerate(prompts)]
    longest = max(map(len, seqs))
    batch = np.array([q + [EOS] * (longest - len(q)) for q in seqs], np.int32)
    full = np.asarray(jax.jit(lambda p, t: GPT2(cfg).apply({"params": p}, t))(params, batch))
    for b, prompt in enumerate(prompts):
        want = full[b, len(prompt) - 1: len(seqs[b])]  # logits predicting each new token
        got = np.stack([c[b] for c in cached])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_each_row_stops_at_its_own_eos(reference):
    cfg, _, params = reference
    prompts = _prompts()
    base = generate_tokens(params, cfg, prompts, max_new_tokens=20, greedy=True)
    assert all(EOS not in row and len(row) == 20 for row in base)
    # Make a token that row 0 emits mid-way (and row 1 never emits) the end-of-sequence id.
    stop = next(t for t in base[0][3:] if t not in base[1])
    got = generate_tokens(params, cfg, prompts, max_new_tokens=20, greedy=True, eos_id=stop)
    want = [row[: row.index(stop)] if stop in row else row for row in base]
    assert got == want
    assert len(got[0]) < 20 and len(got[1]) == 20


def test_finished_rows_emit_eos(reference):
    cfg, _, params = reference
    prompts = _prompts()
    base = generate_tokens(params, cfg, prompts, max_new_tokens=20, greedy=True)
    stop = base[0][2]
    tokens, lens = left_pad(prompts, 32, stop)
    sampler = compiled_sampler(jax.default_backend())
    raw = np.asarray(sampler(decoding_params(params, cfg), tokens, lens, np.zeros(4, bool), jax.random.key(0),
                             np.float32(1), np.float32(1), np.int32(stop), cfg=cfg, max_new_tokens=20, top_k=0,
                             greedy=True, use_top_p=False))
    first = list(raw[0]).index(stop)
    assert first <= 2 and (raw[0, first:] == stop).all()


# -------------------------------------------------------------------------------- sampling


def _allowed_sets(logits: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0) -> list[set[int]]:
    """Independent reference: the tokens transformers' warpers would leave for each row."""
    out = []
    for row in logits / temperature:
        order = np.argsort(-row, kind="stable")
        keep = set(range(len(row)))
        if top_k:
            keep = {int(i) for i in np.flatnonzero(row >= row[order[top_k - 1]])}
        if top_p < 1:
            cand = [int(i) for i in order if int(i) in keep]
            z = row[cand] - row[cand].max()
            probs = np.exp(z) / np.exp(z).sum()
            mass_above = np.cumsum(probs) - probs
            keep = {i for i, m in zip(cand, mass_above) if m < top_p} | {cand[0]}
        out.append(keep)
    return out


def _test_logits(rows=6, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, vocab)) * 2.0).astype(np.float32)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_filter_top_p_keeps_the_nucleus(p):
    logits = _test_logits()
    got = np.asarray(filter_top_p(jnp.asarray(logits), p))
    sizes = []
    for row, want in zip(got, _allowed_sets(logits, top_p=p)):
        assert set(np.flatnonzero(np.isfinite(row)).tolist()) == want
        sizes.append(len(want))
    assert min(sizes) < logits.shape[1]  # the filter does remove tokens...
    if p >= 0.5:
        assert max(sizes) > 1  # ...but not down to the argmax alone


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.6, 1.0), (5, 1.0, 1.0), (8, 0.7, 0.7), (0, 0.8, 1.5)])
def test_sampling_never_leaves_the_allowed_set(top_k, top_p, temperature):
    logits = _test_logits()
    allowed = _allowed_sets(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    draw = jax.jit(jax.vmap(lambda key: sample_logits(jnp.asarray(logits), key, temperature, top_p, top_k=top_k,
                                                      greedy=False, use_top_p=top_p < 1)))
    samples = np.asarray(draw(jax.random.split(jax.random.key(0), 2000)))  # (seeds, rows)
    for r, want in enumerate(allowed):
        seen = set(samples[:, r].tolist())
        assert seen <= want
        assert seen == want or len(want) > 12  # and every allowed token does get drawn


def test_temperature_shapes_the_distribution():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
    keys = jax.random.split(jax.random.key(3), 4000)
    for t in (0.5, 2.0):
        draw = jax.vmap(lambda key, t=t: sample_logits(logits, key, t, 1.0, top_k=0, greedy=False, use_top_p=False))
        freq = np.bincount(np.asarray(draw(keys))[:, 0], minlength=3) / len(keys)
        want = np.array([0.7, 0.2, 0.1]) ** (1 / t)
        np.testing.assert_allclose(freq, want / want.sum(), atol=0.03)


def test_same_seed_same_samples_different_seed_different(reference):
    cfg, _, params = reference
    prompts = _prompts()
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50)
    a = generate_tokens(params, cfg, prompts, seed=7, **kw)
    b = generate_tokens(params, cfg, prompts, seed=7, **kw)
    c = generate_tokens(params, cfg, prompts, seed=8, **kw)
    assert a == b
    assert a != c
    assert a[0] != a[0][:1] * len(a[0])  # samples vary within a row too


# ----------------------------------------------------------------------------- shapes & limits


def test_one_compile_per_bucket(reference):
    cfg, _, params = reference
    cfg = dataclasses.replace(cfg, layer_norm_epsilon=1.1e-5)  # a config no other test compiled
    sampler = compiled_sampler(jax.default_backend())
    before = sampler._cache_size()
    generate_tokens(params, cfg, _prompts((3, 9, 2)), max_new_tokens=4, greedy=True)
    generate_tokens(params, cfg, _prompts((12, 1, 16, 7)), max_new_tokens=4, greedy=True, eos_id=5)
    assert sampler._cache_size() == before + 1  # both are (T=16, B=4)
    generate_tokens(params, cfg, _prompts((17,)), max_new_tokens=4, greedy=True)
    assert sampler._cache_size() == before + 2  # T=32, B=1 is a new bucket


def test_too_long_prompt_names_the_limit(reference):
    cfg, _, params = reference
    with pytest.raises(ConfigError, match="n_positions=64"):
        generate_tokens(params, cfg, _prompts((50,)), max_new_tokens=20, greedy=True)
    # Exactly filling the context is fine: the prompt bucket shrinks to fit (64 - 20 = 44 slots).
    out = generate_tokens(params, cfg, _prompts((44,)), max_new_tokens=20, greedy=True)
    assert len(out[0]) == 20


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory made the way a user makes one: save_pretrained, then `flax-gpt import-hf`."""
    from flax_gpt.cli import main

    cfg = tiny_model_config()
    hf_dir = tmp_path_factory.mktemp("hf") / "model"
    lively_reference(cfg).save_pretrained(hf_dir)
    run = tmp_path_factory.mktemp("runs") / "imported"
    assert main(["import-hf", str(hf_dir), "--out", str(run)]) == 0
    return run, hf_dir


def _cli_json(capsys, argv):
    from flax_gpt.cli import main

    capsys.readouterr()
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_cli_backends_agree_on_greedy_text(run_dir, capsys):
    run, hf_dir = run_dir
    common = ["--prompt", "The model", "--prompt", "In this paper we propose", "--greedy",
              "--max-new-tokens", "10", "--json"]
    via_hf = _cli_json(capsys, ["generate", str(run), "--backend", "transformers", *common])
    via_jax = _cli_json(capsys, ["generate", str(run), "--backend", "jax", *common])
    # An HF folder without tokenizer files (save_pretrained of the model alone): GPT-2's is used.
    via_hf_dir = _cli_json(capsys, ["generate", "--hf", str(hf_dir), "--backend", "jax", *common])
    via_hf_dir_tf = _cli_json(capsys, ["generate", "--hf", str(hf_dir), "--backend", "transformers", *common])
    assert [r["prompt"] for r in via_hf] == ["The model", "In this paper we propose"]
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in via_hf)
    assert via_jax == via_hf
    assert via_hf_dir == via_hf and via_hf_dir_tf == via_hf


def test_cli_sampling_json_has_one_line_per_sample(run_dir, capsys):
    run, _ = run_dir
    rows = _cli_json(capsys, ["generate", str(run), "--prompt", "Deep learning", "--num-samples", "3",
                              "--top-k", "20", "--top-p", "0.9", "--max-new-tokens", "8", "--seed", "1", "--json"])
    assert [r["sample"] for r in rows] == [0, 1, 2]
    assert len({r["text"] for r in rows}) > 1


def test_cli_too_long_is_one_line_error(run_dir, capsys):
    from flax_gpt.cli import main

    run, _ = run_dir
    rc = main(["generate", str(run), "--prompt", "word " * 10, "--max-new-tokens", "60"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "n_positions=64" in err[0]


_SHARDED = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, sys.argv[1])
import jax
from conftest import params_from_torch, tiny_model_config, torch_reference
from flax_gpt.config import MeshConfig
from flax_gpt.generate import generate_tokens
from flax_gpt.model.gpt2 import abstract_params
from flax_gpt.sharding import make_mesh, param_shardings

cfg = tiny_model_config(pad_vocab_to=128)  # a vocab the mesh axes divide
params = params_from_torch(torch_reference(cfg), cfg)
mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
sharded = jax.device_put(params, param_shardings(mesh, abstract_params(cfg, boxed=True)))
assert len(sharded["h_0"]["mlp"]["c_fc"]["kernel"].sharding.device_set) == 4
prompts = [[464, 2746, 318], [818, 428, 3348, 356, 2222, 257]]
kw = dict(max_new_tokens=6, temperature=1.0, top_k=100, seed=3)
a = generate_tokens(params, cfg, prompts, **kw)
b = generate_tokens(sharded, cfg, prompts, **kw)
assert a == b and len(a[0]) == 6, (a, b)
print("ok")
"""


@pytest.mark.slow
def test_params_sharded_over_a_mesh_give_the_same_tokens():
    """fsdp x tensor sharded parameters on 4 fake CPU devices: jit follows the inputs' shardings."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(here)], capture_output=True, text=True,
                          cwd=here.parent, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
