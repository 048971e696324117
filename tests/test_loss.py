"""The chunked cross-entropy (`model/loss.py`) against the full-logits reference (float32 (B,T,V)
logits through the tied head, optax's cross-entropy): loss and gradients in float32 and bfloat16,
the loss mask, padded vocabulary rows, chunks that do not divide T, a mesh, the model's own loss,
and a compiled train step that no longer holds float32 (B,T,V) logits."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, tiny_model_config

from flax_gpt.model.gpt2 import GPT2, init_params
from flax_gpt.model.loss import cross_entropy_sums, plan_chunks
from flax_gpt.train import step as step_mod

U32 = 2.0**-24  # float32 unit roundoff
U16 = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)
V = 50257


def _reference(h, e, t, w, vocab_size):
    """Today's loss written out: logits = h @ E^T in h's dtype, cast to float32 (B,T,V), padded
    rows at -1e30 (as GPT2.logits), optax's cross-entropy, sum(w * NLL)."""
    logits = jnp.einsum("btd,vd->btv", h, e.astype(h.dtype)).astype(jnp.float32)
    if e.shape[0] != vocab_size:
        logits = jnp.where(jnp.arange(e.shape[0]) < vocab_size, logits, -1e30)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * w)


def _inputs(B, T, D, Vp, seed=0, mask_p=0.25):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    e = (rng.standard_normal((Vp, D)) * 0.3).astype(np.float32)  # logits of std ~1.7: a spread softmax
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    w = (rng.random((B, T)) >= mask_p).astype(np.float32)
    return h, e, t, w


def _grads(fn, h, e, t, w):
    """(loss, d/dh, d/dE, d/dw) of fn(h, e, w)."""
    loss, g = jax.value_and_grad(fn, argnums=(0, 1, 2))(h, e, w)
    return [np.asarray(x, np.float64) for x in (loss, *g)]


def _bounds(h, e, t, w, vocab_size, u_in):
    """First-order bounds on |computed - exact| of (loss, dh, dE, dw) for a path whose inputs h, E
    are rounded with unit roundoff u_in (0: float32 throughout, U16: bfloat16 compute) and whose
    accumulations are float32. Exact values are float64 from the float32 inputs.

    With a_tv = sum_i |h_ti E_vi| and L_t = max_v a_tv:
    - a logit is a D-term dot: input rounding 2 u_in a_tv, float32 accumulation D U32 a_tv (worst
      case), so |dl_tv| <= c L_t, c = 2 u_in + D U32;
    - logsumexp moves by at most max_v |dl| plus the rounding of its V-term sum (a tree reduction:
      log2(V) U32) and of exp/log (a few U32, with |lse| for the log); NLL = lse - l_target, so
      |dNLL_t| <= r_t = 2 c L_t + (log2 V + 3 + |lse_t|) U32, and the loss adds the rounding of its
      own N-term sum, log2(N) U32 sum w NLL;
    - p = exp(l - lse) moves by p r_t; dh_t = w_t sum_v (p - y) E_v adds its V-term sum (log2 V U32)
      and, in bfloat16, the rounding of (p - y), of E and of the result (3 u_in), all relative to
      M_td = sum_v (p + y)|E_vd| >= sum_v |p - y||E_vd|; dE_vd = sum_t w_t (p - y) h_td likewise
      with its N-term sum and 2 u_in, relative to G_vd = sum_t w_t (p + y)|h_td|; d/dw_t = NLL_t.
    """
    h64, e64 = h.astype(np.float64).reshape(-1, h.shape[-1]), e.astype(np.float64)
    w64, t_flat = w.astype(np.float64).reshape(-1), t.reshape(-1)
    N, D = h64.shape
    logits = h64 @ e64.T
    logits[:, vocab_size:] = -np.inf
    lse = np.logaddexp.reduce(logits, axis=1)
    p = np.exp(logits - lse[:, None])
    y = np.zeros_like(p)
    y[np.arange(N), t_flat] = 1.0
    nll = lse - logits[np.arange(N), t_flat]
    L = (np.abs(h64) @ np.abs(e64[:vocab_size]).T).max(axis=1)
    r = 2 * (2 * u_in + D * U32) * L + (np.log2(vocab_size) + 3 + np.abs(lse)) * U32
    loss_b = np.sum(w64 * r) + np.log2(N) * U32 * np.sum(w64 * nll)
    M = (p + y) @ np.abs(e64)
    dh_b = (w64 * (r + 3 * u_in + np.log2(vocab_size) * U32))[:, None] * M
    G = (w64[:, None] * (p + y)).T @ np.abs(h64)
    de_b = (r.max() + 2 * u_in + np.log2(N) * U32) * G
    return loss_b, dh_b.reshape(h.shape), de_b, r.reshape(w.shape)


def _assert_within(got, want, bound, name):
    excess = np.abs(got - want) - bound
    at = np.unravel_index(np.argmax(excess), np.shape(excess))
    assert np.all(excess <= 0), f"{name}: {np.max(excess):.3g} over the bound at {at}"


def test_plan_chunks_fits_the_budget_and_prefers_divisors():
    per_position = 4 * V * 4  # B=4 rows of float32 logits
    p = plan_chunks(4, 256, V, V, budget=64 * 2**20)
    assert p.chunk * per_position <= 64 * 2**20 and 256 % p.chunk == 0 and p.chunk * p.n_chunks == 256
    assert (p.chunk, p.n_chunks) == (64, 4)  # 83 positions fit; 64 divides 256
    odd = plan_chunks(4, 257, V, V, budget=64 * 2**20)  # 257 is prime: 4 chunks of 65, the last overlapping by 3
    assert (odd.chunk, odd.n_chunks) == (65, 4)
    # On a mesh a device holds B/shards rows and V/shards columns: larger chunks, same bytes.
    assert plan_chunks(4, 256, V, V, batch_shards=2, vocab_shards=2, budget=64 * 2**20).chunk == 256
    assert plan_chunks(2, 64, V, V, chunk=10).n_chunks == 7
    assert plan_chunks(2, 64, V, V, budget=1).chunk == 1  # never zero


@pytest.mark.parametrize("Vp,chunk", [(V, None), (50304, 5), (50304, 16)])
def test_float32_loss_and_gradients_match_full_logits(Vp, chunk):
    h, e, t, w = _inputs(2, 48, 32, Vp)
    ours = _grads(lambda h, e, w: cross_entropy_sums(h, e, t, w, vocab_size=V, chunk=chunk)[0], h, e, t, w)
    ref = _grads(lambda h, e, w: _reference(h, e, t, w, V), h, e, t, w)
    # Both paths are within the float32 bounds of the exact values, so within twice of each other.
    loss_b, dh_b, de_b, dw_b = (2 * b for b in _bounds(h, e, t, w, V, 0.0))
    for got, want, bound, name in zip(ours, ref, (loss_b, dh_b, de_b, dw_b), ("loss", "dh", "dE", "dw")):
        _assert_within(got, want, bound, name)
    assert np.all(ours[2][V:] == 0)  # padded rows: exactly no gradient
    assert loss_b < 1e-4 * ref[0]  # the bound is tight enough to mean something


def test_bfloat16_compute_close_to_the_float32_reference():
    h, e, t, w = _inputs(2, 32, 32, 50304, seed=1)
    ours = _grads(lambda h, e, w: cross_entropy_sums(h.astype(jnp.bfloat16), e, t, w, vocab_size=V)[0], h, e, t, w)
    ref = _grads(lambda h, e, w: _reference(h, e, t, w, V), h, e, t, w)
    bounds = [a + b for a, b in zip(_bounds(h, e, t, w, V, U16), _bounds(h, e, t, w, V, 0.0))]
    for got, want, bound, name in zip(ours, ref, bounds, ("loss", "dh", "dE", "dw")):
        _assert_within(got, want, bound, name)
    assert ours[0] != ref[0]  # the bf16 path really ran in bf16
    # The head's gradient comes back float32 (accumulated in float32), h's in h's dtype.
    g = jax.grad(lambda h, e: cross_entropy_sums(h, e, t, w, vocab_size=V)[0], argnums=(0, 1))(
        jnp.asarray(h, jnp.bfloat16), e)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.float32


def test_mask_and_padded_rows_take_no_part():
    h, e, t, w = _inputs(2, 24, 32, 50304, seed=2, mask_p=0.5)
    f = jax.jit(lambda h, e, t, w: cross_entropy_sums(h, e, t, w, vocab_size=V, chunk=7))
    loss, count = f(h, e, t, w)
    assert float(count) == w.sum()
    off = w == 0
    h2, t2, e2 = h.copy(), t.copy(), e.copy()
    h2[off] = 100.0  # masked positions: any hidden state, any target
    t2[off] = 7
    e2[V:] = 100.0  # padded rows: any values
    assert float(f(h2, e2, t2, w)[0]) == float(loss)
    dh = jax.grad(lambda h: f(h, e, t, w)[0])(h)
    assert np.all(np.asarray(dh)[off] == 0) and np.all(np.abs(np.asarray(dh)[~off]).max(axis=-1) > 0)
    # Fractional weights scale each token's share, as in the reference.
    wf = np.linspace(0, 1, w.size, dtype=np.float32).reshape(w.shape)
    ref = float(_reference(h, e, t, wf, V))
    assert abs(float(f(h, e, t, wf)[0]) - ref) <= 2 * _bounds(h, e, t, wf, V, 0.0)[0]


def test_the_models_loss_matches_full_logits_with_the_document_mask():
    """`loss_sums` (training and evaluation) against its full-logits reference through a real model:
    gradients of every parameter, with packed documents and a padded vocabulary."""
    cfg = tiny_model_config(n_layer=1, n_embd=32, n_head=2, pad_vocab_to=128)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, V, (2, 33)).astype(np.int32)
    tokens[:, [5, 17]] = 50256  # EOS: three documents a row
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": (rng.random((2, 32)) > 0.1).astype(np.float32)}
    kw = {"model": GPT2(cfg), "document_mask": True, "eos_id": 50256}
    grad_fn = jax.jit(jax.value_and_grad(step_mod.loss_sums, has_aux=True), static_argnames=("model", "document_mask",
                                                                                             "eos_id", "full_logits"))
    (l_ours, c_ours), g_ours = grad_fn(params, batch=batch, full_logits=False, **kw)
    (l_ref, c_ref), g_ref = grad_fn(params, batch=batch, full_logits=True, **kw)
    assert float(c_ours) == float(c_ref) == batch["loss_mask"].sum()
    # The hidden states are the same computation on both sides; only the head differs.
    h = np.asarray(jax.jit(lambda p: GPT2(cfg).apply(
        {"params": p}, batch["inputs"], *step_mod.document_positions(batch["inputs"], 50256),
        method=lambda m, x, pos, seg: m.hidden(x, pos, seg)[0]))(params))
    bound = 2 * _bounds(h, np.asarray(params["wte"]["embedding"]), batch["targets"], batch["loss_mask"], V, 0.0)[0]
    assert abs(float(l_ours) - float(l_ref)) <= bound
    evaluated = jax.jit(functools.partial(step_mod.eval_step, **kw))(params, batch)  # the loss alone, no gradient
    assert abs(float(evaluated["loss_sum"]) - float(l_ref)) <= bound
    # Gradients: the head's are within the bounds above; the blocks' are the same backward pass
    # fed those, held to the HF-parity tolerance of tests/test_model.py (1e-4 of each tensor's scale).
    for path, a in jax.tree_util.tree_flatten_with_path(g_ours)[0]:
        b = functools.reduce(lambda x, k: x[k.key], path, g_ref)
        scale = float(np.max(np.abs(b))) or 1.0
        assert float(np.max(np.abs(a - b))) / scale <= 1e-4, jax.tree_util.keystr(path)
    assert np.all(np.asarray(g_ours["wte"]["embedding"])[V:] == 0)


def _compile_train_step(monkeypatch, full_logits: bool):
    from flax_gpt.config_files import load_config
    from flax_gpt.train.state import StateBuilder

    if full_logits:  # the same step with today's loss
        monkeypatch.setattr(step_mod, "loss_sums", functools.partial(step_mod.loss_sums, full_logits=True))
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_positions=512",
                       "data.seq_len=512", "train.batch_size=4", "mesh.data=1"])
    b = StateBuilder(cfg, 10, devices=jax.devices()[:1])
    return b.step_fn.lower(b.abstract, b.abstract_batch()).compile()


def test_the_compiled_train_step_holds_no_float32_logits(monkeypatch):
    """A small model at B=4, T=512 with GPT-2's vocabulary, so the float32 (B,T,V) logits (393 MiB)
    dwarf everything else (parameters 6.5 MiB): with them the step's temporaries exceed one such
    array; without them they hold a few chunk-sized buffers (`LOGITS_CHUNK_BYTES` each: ~200 MiB
    here) and the head's gradient."""
    logits_bytes = 4 * 512 * V * 4
    shapes = ("f32[4,512,50257]", "f32[2048,50257]", "f32[50257,2048]")
    ours = _compile_train_step(monkeypatch, full_logits=False)
    ref = _compile_train_step(monkeypatch, full_logits=True)
    ours_temp, ref_temp = ours.memory_analysis().temp_size_in_bytes, ref.memory_analysis().temp_size_in_bytes
    assert ref_temp > logits_bytes and any(s in ref.as_text() for s in shapes)
    assert ours_temp < logits_bytes and not any(s in ours.as_text() for s in shapes), (ours_temp, ref_temp)


_MESH_SCRIPT = """
import json, re, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax_gpt.config import MeshConfig
from flax_gpt.model.loss import cross_entropy_sums
from flax_gpt.sharding import make_mesh, on_mesh
d = np.load(sys.argv[1])
mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
def f(h, e, t, w):
    return jax.value_and_grad(lambda h, e: cross_entropy_sums(h, e, t, w, vocab_size=50257, chunk=8)[0],
                              argnums=(0, 1))(h, e)
rows, head = NamedSharding(mesh, P(("data", "fsdp"), None, None)), NamedSharding(mesh, P("tensor", "fsdp"))
tok = NamedSharding(mesh, P(("data", "fsdp"), None))
# The head's gradient leaves laid out as the parameter, as in the train step (where it meets the optimizer).
c = jax.jit(on_mesh(f, mesh), in_shardings=(rows, head, tok, tok),
            out_shardings=(NamedSharding(mesh, P()), (rows, head)))
c = c.lower(d["h"], d["e"], d["t"], d["w"]).compile()
text = c.as_text()
loop = []  # collectives inside the chunk loop's body, with their shapes
for body in set(re.findall(r"body=%?([\\w.\\-]+)", text)):
    start = text.index("\\n%" + body + " ")
    seg = text[start:text.index("\\n}\\n", start)]
    loop += re.findall(r"= (\\S+) (?:all-reduce|reduce-scatter|all-gather|all-to-all)", seg)
loss, (dh, de) = c(d["h"], d["e"], d["t"], d["w"])
np.savez(sys.argv[2], loss=np.asarray(loss), dh=np.asarray(dh), de=np.asarray(de))
print(json.dumps({"loop_collectives": loop}))
"""


def test_on_a_mesh_the_chunks_keep_the_logits_sharding(tmp_path):
    """data=2 x fsdp=2 x tensor=2 on 8 CPU devices: the same loss and gradients, and inside the
    chunk loop only (B,c)-sized collectives (the logsumexp over the split vocabulary, dh over it);
    the head's gradient is reduced once, after the loop, not once per chunk."""
    h, e, t, w = _inputs(8, 32, 64, 50304, seed=4)
    np.savez(tmp_path / "in.npz", h=h, e=e, t=t, w=w)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    loop = json.loads(r.stdout.strip().splitlines()[-1])["loop_collectives"]
    assert loop and all(np.prod([int(x) for x in s.split("[")[1].split("]")[0].split(",") if x]) <= 8 * 8 * 64
                        for s in loop), loop
    got = np.load(tmp_path / "out.npz")
    ref = _grads(lambda h, e, w: _reference(h, e, t, w, V), h, e, t, w)
    loss_b, dh_b, de_b, _ = (2 * b for b in _bounds(h, e, t, w, V, 0.0))
    for name, want, bound in (("loss", ref[0], loss_b), ("dh", ref[1], dh_b), ("de", ref[2], de_b)):
        _assert_within(got[name].astype(np.float64), want, bound, name)


def test_bf16_model_loss_matches_its_full_logits_reference():
    """The model in bfloat16: the chunked loss keeps float32 logits where today's path rounds them
    to bfloat16 first, so the two differ by at most that rounding of each logit (|l| U16); the
    logsumexp and target logit each move by at most the largest, 2 max|l| U16 per token, plus each
    path's float32 rounding (log2 V + 3 + |lse|) U32 per token and log2 N U32 of the sum."""
    cfg = tiny_model_config(n_layer=1, n_embd=32, n_head=2, dtype="bfloat16")
    params = nn.unbox(init_params(cfg, jax.random.key(1)))
    tokens = np.random.default_rng(5).integers(0, V, (2, 33)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 32), np.float32)}
    kw = {"model": GPT2(cfg), "batch": batch, "document_mask": False, "eos_id": 50256}
    ours = float(step_mod.loss_sums(params, **kw)[0])
    ref = float(step_mod.loss_sums(params, full_logits=True, **kw)[0])
    logits = np.asarray(GPT2(cfg).apply({"params": params}, batch["inputs"]), np.float64)
    lse = np.logaddexp.reduce(logits, axis=-1)
    bound = (np.sum(2 * np.abs(logits).max(axis=-1) * U16 + 2 * (np.log2(V) + 3 + np.abs(lse)) * U32)
             + 2 * np.log2(64) * U32 * abs(ref))
    assert 0 < abs(ours - ref) <= bound, (ours, ref, bound)
