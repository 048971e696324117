"""flax_gpt.train.optim against independent references: Keras' ExponentialDecay and a numpy formula for
the schedule, nanoGPT's `ndim >= 2` rule for the decay mask, torch.optim.AdamW (+ clip_grad_norm_)
for the optimizer steps."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_gpt.config import OptimConfig
from flax_gpt.config_files import build_config
from flax_gpt.train.optim import build_optimizer, decay_mask, make_schedule

STEPS = np.unique(np.concatenate([np.arange(0, 40), np.arange(0, 5000, 37), [999, 1000, 1001, 4999]]))


def reference_lr(step: int, cfg: OptimConfig) -> float:
    """The documented schedule, in float64 numpy: linear warmup, then Keras' formula from its end."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.learning_rate * step / w
    p = (step - w) / cfg.decay_steps
    if cfg.staircase:
        p = np.floor(p)
    return cfg.learning_rate * cfg.decay_rate**p


SCHEDULE_CASES = [
    dict(staircase=False, warmup_steps=0),
    dict(staircase=True, warmup_steps=0),
    dict(staircase=False, warmup_steps=100),
    dict(staircase=True, warmup_steps=100),
]


def _schedule_cfg(**kw) -> OptimConfig:
    return OptimConfig(learning_rate=6e-4, decay_steps=250, decay_rate=0.7, **kw)


@pytest.mark.parametrize("kw", SCHEDULE_CASES, ids=lambda kw: f"stair{kw['staircase']}-warm{kw['warmup_steps']}")
def test_schedule_matches_reference_formula_on_traced_steps(kw):
    cfg = _schedule_cfg(**kw)
    # vmap under jit: the step is a traced int32, as inside the train step.
    ours = np.asarray(jax.jit(jax.vmap(make_schedule(cfg, 5000)))(jnp.asarray(STEPS, jnp.int32)))
    ref = np.array([reference_lr(int(s), cfg) for s in STEPS])
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=0)
    # A plain Python int step (e.g. for logging) gives the same value.
    assert float(make_schedule(cfg, 5000)(1001)) == pytest.approx(reference_lr(1001, cfg), rel=2e-6)


@pytest.mark.parametrize("kw", SCHEDULE_CASES, ids=lambda kw: f"stair{kw['staircase']}-warm{kw['warmup_steps']}")
def test_schedule_matches_keras_exponential_decay(kw):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    cfg = _schedule_cfg(**kw)
    keras_sched = keras.optimizers.schedules.ExponentialDecay(
        cfg.learning_rate, cfg.decay_steps, cfg.decay_rate, staircase=cfg.staircase
    )
    w = cfg.warmup_steps
    after = STEPS[STEPS >= w]
    ours = np.asarray(jax.vmap(make_schedule(cfg, 5000))(jnp.asarray(after, jnp.int32)))
    # Keras has no warmup: after ours' warmup, its clock is shifted by warmup_steps.
    ref = np.asarray(keras_sched(after - w))  # Keras' own float32 arithmetic, all steps at once
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# The other schedules against transformers' own LambdaLR schedules (torch), step by step.

TOTAL, WARMUP = 400, 30


def _transformers_lrs(name: str, cfg: OptimConfig) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers import optimization as topt

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    make = {
        "cosine": lambda: topt.get_cosine_with_min_lr_schedule_with_warmup(
            opt, WARMUP, TOTAL, min_lr_rate=cfg.min_lr_ratio),
        "linear": lambda: topt.get_linear_schedule_with_warmup(opt, WARMUP, TOTAL),
        "constant": lambda: topt.get_constant_schedule_with_warmup(opt, WARMUP),
        "wsd": lambda: topt.get_wsd_schedule(opt, WARMUP, int(cfg.decay_fraction * TOTAL), TOTAL,
                                             decay_type="linear", min_lr_ratio=cfg.min_lr_ratio),
    }[name]
    sched = make()
    lrs = []
    for _ in range(TOTAL + 5):  # LambdaLR's lr for optimizer step k is lambda(k): read, then step
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


@pytest.mark.parametrize("name,min_ratio", [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0),
                                            ("constant", 0.0), ("wsd", 0.0)])
def test_schedules_match_transformers(name, min_ratio):
    cfg = OptimConfig(schedule=name, learning_rate=3e-4, warmup_steps=WARMUP, min_lr_ratio=min_ratio,
                      decay_fraction=0.25)
    ours = np.asarray(jax.jit(jax.vmap(make_schedule(cfg, TOTAL)))(jnp.arange(TOTAL + 5, dtype=jnp.int32)))
    ref = _transformers_lrs(name, cfg)
    np.testing.assert_allclose(ours[: TOTAL + 1], ref[: TOTAL + 1], rtol=1e-5, atol=1e-10)
    # Past the run's end ours holds the final rate (transformers' cosine would start rising again).
    assert np.all(ours[TOTAL:] == ours[TOTAL])
    assert ours[0] == 0.0 and ours[WARMUP] == pytest.approx(3e-4)  # warmup starts at 0, peaks once


def test_cosine_matches_torch_cosine_annealing_after_warmup():
    torch = pytest.importorskip("torch")
    cfg = OptimConfig(schedule="cosine", learning_rate=1e-3, warmup_steps=0, min_lr_ratio=0.05)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=cfg.learning_rate * 0.05)
    ref = []
    for _ in range(TOTAL + 1):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = np.asarray(jax.vmap(make_schedule(cfg, TOTAL))(jnp.arange(TOTAL + 1, dtype=jnp.int32)))
    np.testing.assert_allclose(ours, np.array(ref), rtol=1e-5)


def test_schedule_registry_is_the_configs_choice_list():
    from flax_gpt.schedules import SCHEDULES

    choices = {f.name: f for f in dataclasses.fields(OptimConfig)}["schedule"].metadata["choices"]
    assert choices is SCHEDULES
    assert tuple(choices) == ("exponential", "cosine", "linear", "constant", "wsd")


# ---------------------------------------------------------------------------------------------
# Parameter trees named as the model's (HF GPT-2 names, Flax leaves).


def gpt2_tree(rng: np.random.Generator, n_layer=2, D=8, V=16, P=8) -> dict:
    """Non-trivial values everywhere (LayerNorm scales near 1, biases non-zero), so decaying a
    leaf that shouldn't be decayed changes the result."""

    def n(*shape, loc=0.0, scale=0.5):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    def ln():
        return {"scale": n(D, loc=1.0, scale=0.1), "bias": n(D, scale=0.1)}

    def dense(i, o):
        return {"kernel": n(i, o), "bias": n(o, scale=0.1)}

    tree = {"wte": {"embedding": n(V, D)}, "wpe": {"embedding": n(P, D)}, "ln_f": ln()}
    for i in range(n_layer):
        tree[f"h_{i}"] = {
            "ln_1": ln(),
            "attn": {"c_attn": dense(D, 3 * D), "c_proj": dense(D, D)},
            "ln_2": ln(),
            "mlp": {"c_fc": dense(D, 4 * D), "c_proj": dense(4 * D, D)},
        }
    return tree


def nanogpt_decays(path, leaf, decay_embeddings: bool) -> bool:
    """nanoGPT's rule (every tensor with ndim >= 2 is decayed), with embeddings optional."""
    top = path[0].key
    if top in ("wte", "wpe"):
        return decay_embeddings
    return np.ndim(leaf) >= 2


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_mask_is_exactly_the_weight_matrices(decay_embeddings):
    params = gpt2_tree(np.random.default_rng(0), n_layer=2)
    mask = decay_mask(params, decay_embeddings=decay_embeddings)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    expected = jax.tree_util.tree_map_with_path(lambda p, x: nanogpt_decays(p, x, decay_embeddings), params)
    assert mask == expected
    # Counted by name, too: 4 kernels per block (+ 2 embedding tables), nothing else.
    decayed = sorted(jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m)
    assert len(decayed) == 2 * 4 + (2 if decay_embeddings else 0)
    assert all(s.endswith(("['kernel']", "['embedding']")) for s in decayed)
    # Nesting under {'params': ...} (Flax variables) does not change the decision.
    assert decay_mask({"params": params}, decay_embeddings=decay_embeddings) == {"params": expected}


# ---------------------------------------------------------------------------------------------
# Optimizer steps against torch.optim.AdamW.

# Per-step gradient scales: step 1 far above clip_norm, step 2 below it, step 3 above again, so
# clipping changes Adam's moment mix; with ~30% of entries shrunk by 1e-6 the eps term matters.
GRAD_SCALES = (30.0, 0.05, 3.0)


def make_grads(params: dict, step: int, rng_seed=1) -> dict:
    """Gradient at `step` as a function of the current params (like a real loss), in numpy."""
    rng = np.random.default_rng(rng_seed + step)

    def g(p):
        noise = rng.standard_normal(p.shape)
        tiny = np.where(rng.random(p.shape) < 0.3, 1e-6, 1.0)
        return (GRAD_SCALES[step] * tiny * (noise + 0.5 * p)).astype(np.float32)

    return jax.tree.map(g, params)


def run_optax(cfg: OptimConfig, params: dict, n_steps: int) -> dict:
    tx = build_optimizer(cfg, 1000)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for t in range(n_steps):
        grads = make_grads(jax.tree.map(np.asarray, params), t)
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return jax.tree.map(np.asarray, params)


def run_torch(cfg: OptimConfig, params: dict, n_steps: int, *, eps: float, clip_norm: float) -> dict:
    """torch.optim.AdamW with nanoGPT's two param groups; lr from the reference formula."""
    torch = pytest.importorskip("torch")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    tensors = [torch.nn.Parameter(torch.tensor(np.array(x))) for _, x in leaves]
    decay = [nanogpt_decays(p, x, cfg.decay_embeddings) for p, x in leaves]
    groups = [
        {"params": [t for t, d in zip(tensors, decay) if d], "weight_decay": cfg.weight_decay},
        {"params": [t for t, d in zip(tensors, decay) if not d], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=eps)
    for t in range(n_steps):
        current = treedef.unflatten([x.detach().numpy() for x in tensors])
        for x, g in zip(tensors, jax.tree.leaves(make_grads(current, t))):
            x.grad = torch.tensor(g)
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(tensors, clip_norm)
        for group in opt.param_groups:
            group["lr"] = reference_lr(t, cfg)
        opt.step()
    return treedef.unflatten([x.detach().numpy() for x in tensors])


def assert_trees_close(a: dict, b: dict, atol: float):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def _parity_cfg(**kw) -> OptimConfig:
    # lr large enough that any difference (mask, eps, clipping, schedule) is far above 1e-6.
    base = dict(learning_rate=1e-2, decay_steps=2, decay_rate=0.5, weight_decay=0.1, b1=0.8, b2=0.95)
    return OptimConfig(**{**base, **kw})


@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("clip_norm", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("decay_embeddings", [True, False], ids=["decay_emb", "keep_emb"])
def test_adamw_steps_match_torch(n_steps, clip_norm, decay_embeddings):
    # The 3-step runs include one warmup step (lr 0 at step 0) and decay afterwards.
    cfg = _parity_cfg(clip_norm=clip_norm, decay_embeddings=decay_embeddings, warmup_steps=n_steps // 3)
    params = gpt2_tree(np.random.default_rng(0))
    ours = run_optax(cfg, params, n_steps)
    ref = run_torch(cfg, params, n_steps, eps=cfg.eps, clip_norm=clip_norm)
    assert_trees_close(ours, ref, atol=1e-6)
    # The comparison has teeth: the parameters actually moved by much more than the tolerance.
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(params)))
    assert moved > 1e-3


def test_decoupled_weight_decay_is_p_minus_lr_wd_p():
    # With zero gradients Adam's step is 0/(0+eps) = 0, so one step is pure weight decay:
    # p <- p - lr*wd*p on decayed leaves, unchanged elsewhere, in both optax (ours) and torch.
    torch = pytest.importorskip("torch")
    cfg = _parity_cfg(clip_norm=0.0)
    params = jax.tree.map(jnp.asarray, gpt2_tree(np.random.default_rng(0)))
    tx = build_optimizer(cfg, 1000)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    ours = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    lr, wd = reference_lr(0, cfg), cfg.weight_decay
    closed_form = treedef.unflatten(
        [np.asarray(x) * (1 - lr * wd) if nanogpt_decays(p, x, True) else np.asarray(x) for p, x in leaves]
    )
    tensors = [torch.nn.Parameter(torch.tensor(np.array(x))) for _, x in leaves]
    opt = torch.optim.AdamW(
        [{"params": [t], "weight_decay": wd if nanogpt_decays(p, x, True) else 0.0}
         for t, (p, x) in zip(tensors, leaves)],
        lr=lr, eps=cfg.eps,
    )
    for t in tensors:
        t.grad = torch.zeros_like(t)
    opt.step()
    torch_out = treedef.unflatten([t.detach().numpy() for t in tensors])
    assert_trees_close(ours, closed_form, atol=1e-6)
    assert_trees_close(torch_out, closed_form, atol=1e-6)


def test_keras_preset_has_eps_1e7_and_no_clipping():
    cfg = build_config({"optim": {"preset": "keras"}}).optim
    assert (cfg.eps, cfg.clip_norm, cfg.warmup_steps) == (1e-7, 0.0, 0)
    # Behaviourally: 3 steps equal torch AdamW with eps=1e-7 and no clip_grad_norm_. The gradients
    # (norm ~100 at step 1, entries ~1e-6) make a clip or a different eps visible.
    cfg = dataclasses.replace(cfg, **{k: v for k, v in dataclasses.asdict(_parity_cfg()).items()
                                      if k not in ("preset", "eps", "clip_norm", "warmup_steps", "b1", "b2")})
    params = gpt2_tree(np.random.default_rng(0))
    ours = run_optax(cfg, params, 3)
    assert_trees_close(ours, run_torch(cfg, params, 3, eps=1e-7, clip_norm=0.0), atol=1e-6)


def test_a_bfloat16_first_moment_stores_mu_in_bfloat16_and_moves_the_update_by_its_rounding_only():
    """optim.mu_dtype=bfloat16 keeps AdamW's first moment in bfloat16 (half its bytes and traffic);
    the second moment, the parameters and the update stay float32. optax rounds m when it stores
    it, so the first step is exact; the second reads m1 = (1 - b1) g rounded to bfloat16 and
    multiplies it by b1 in bfloat16: b1 itself, m1 and their product are each rounded once, a
    relative error d with |d| <= (1 + 2^-8)^3 - 1.
    With the same gradient g twice: m2 = b1 m1 (1 + d) + (1 - b1) g, and the bias-corrected update
    lr * m2 / (1 - b1^2) / (sqrt(v2_hat) + eps) moves by at most b1 / (1 + b1) * |d| of itself
    (plus float32 rounding)."""
    params = {"kernel": jax.random.normal(jax.random.key(0), (64, 32)), "bias": jnp.zeros((32,))}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-2, params)
    updates = {}
    for mu_dtype in ("float32", "bfloat16"):
        cfg = build_config(overrides=[f"optim.mu_dtype={mu_dtype}", "optim.clip_norm=0", "optim.weight_decay=0"]).optim
        tx = build_optimizer(cfg, total_steps=10)
        state = tx.init(params)
        adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
        assert {x.dtype for s in adam for x in jax.tree.leaves(s.mu)} == {jnp.dtype(mu_dtype)}
        assert {x.dtype for s in adam for x in jax.tree.leaves(s.nu)} == {jnp.dtype("float32")}
        _, state = tx.update(grads, state, params)
        updates[mu_dtype], _ = tx.update(grads, state, params)
    b1 = cfg.b1
    for name in params:
        f32, bf16 = np.asarray(updates["float32"][name]), np.asarray(updates["bfloat16"][name])
        assert bf16.dtype == np.float32
        np.testing.assert_array_less(np.abs(bf16 - f32),
                                     (b1 / (1 + b1) * ((1 + 2.0**-8) ** 3 - 1) + 1e-6) * np.abs(f32) + 1e-30)
        assert not np.array_equal(bf16, f32)  # the rounding is really there
