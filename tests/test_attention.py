"""The attention kernels behind `model.attention` (flax_gpt/model/attention.py) against the XLA path.

Splash runs here in Pallas' interpreter (the TPU kernel's own code, executed on CPU): forward and
gradients against `jax.nn.dot_product_attention`, with and without the document mask. cuDNN
cannot run or even be traced without a GPU (jax checks the cuDNN library while tracing), so its
test checks the call `attend` makes, on a traced-for GPU device. `auto` on CPU must be exactly
today's XLA path, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from flax_gpt.errors import ConfigError
from flax_gpt.model.attention import attend, choose_kernel, splash_block_sizes
from flax_gpt.model.gpt2 import GPT2
from flax_gpt.sharding import AXES

ROOT = Path(__file__).resolve().parents[1]
LIBTPU = os.environ.get("FLAX_GPT_TEST_LIBTPU", "")
B, H, K = 2, 2, 64
T = 384  # three 128-blocks: fully masked, partial (diagonal) and full tiles all occur
U32 = 2.0**-24  # float32 unit roundoff

# Document lengths per row, summing to T: row 0's second and third documents cross the 128- and
# 256-block boundaries; row 1 starts with a one-token document (its query sees only itself).
DOCS = ([100, 60, 150, 74], [1, 200, 183])


def segments() -> jax.Array:
    return jnp.asarray(np.stack([np.repeat(np.arange(1, len(d) + 1), d) for d in DOCS]), jnp.int32)


def qkv_and_cotangent(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(key, (B, T, H, K), jnp.float32).astype(dtype) for key in keys]


def tolerance(reference: jax.Array, chained_sums: int) -> float:
    """Two float32 computations of the same sums in different orders (splash: online softmax over
    128-key blocks; XLA: one softmax over all keys) differ by at most about n * u * sum|terms| per
    sum of n <= T terms (recursive summation, u = 2^-24), and every term of a softmax-weighted sum
    is bounded by the largest value summed. A result that passes through `chained_sums` such sums
    (forward: q.k, the normaliser, p.v; backward adds dO.v, rowsum(dO*O) and the dq/dk/dv
    products) is within chained_sums * T * u * max|result|: 7e-5 (forward) and 1.4e-4 (gradients)
    of the largest value here, 200-500x the differences measured, and far below the O(1) that a
    wrong scale or document mask gives."""
    return chained_sums * T * U32 * float(jnp.max(jnp.abs(reference)))


def values_and_grads(fn, q, k, v, w):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(w))


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "document-mask"])
def test_splash_matches_xla_forward_and_gradients(documents):
    q, k, v, w = qkv_and_cotangent()
    seg = segments() if documents else None
    got = jax.jit(lambda *a: values_and_grads(
        lambda q, k, v: attend(q, k, v, segment_ids=seg, kernel="splash", interpret=True), *a))(q, k, v, w)
    want = jax.jit(lambda *a: values_and_grads(
        lambda q, k, v: attend(q, k, v, segment_ids=seg, kernel="xla"), *a))(q, k, v, w)
    for name, g, r, sums in zip(("out", "dq", "dk", "dv"), got, want, (3, 6, 6, 6)):
        err, tol = float(jnp.max(jnp.abs(g - r))), tolerance(r, sums)
        assert err <= tol, f"{name}: max |splash - xla| = {err:.3g} > {tol:.3g}"
    if documents:  # the mask did something: without it the first document's successors differ
        plain = attend(q, k, v, kernel="xla")
        assert float(jnp.max(jnp.abs(plain - want[0]))) > 1e3 * tolerance(want[0], 3)


def test_block_sizes_follow_the_sequence_length_and_unusable_lengths_fail_in_one_line():
    assert [splash_block_sizes(t).block_q for t in (128, 256, 384, 768, 1024, 2048)] == [128, 256, 128, 256, 512, 512]
    b = splash_block_sizes(1024)
    assert (b.block_kv, b.block_kv_compute, b.block_q_dkv, b.block_kv_dkv, b.block_q_dq, b.block_kv_dq) == (512,) * 6
    assert not b.use_fused_bwd_kernel
    with pytest.raises(ConfigError, match=r"multiple of 128 \(got 200\); use data.seq_len=128") as e:
        splash_block_sizes(200)
    assert "\n" not in str(e.value)
    q, k, v, _ = (t[:, :200] for t in qkv_and_cotangent())
    with pytest.raises(ConfigError, match="multiple of 128"):
        attend(q, k, v, kernel="splash", interpret=True)


def test_auto_on_cpu_is_todays_xla_path_bit_for_bit():
    q, k, v, w = qkv_and_cotangent(jnp.bfloat16)
    seg = segments()

    def today(q, k, v):  # the model's attention before kernels were selectable, written out
        mask = jnp.tril(jnp.ones((T, T), bool))[None, None]
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    got = jax.jit(lambda *a: values_and_grads(lambda q, k, v: attend(q, k, v, segment_ids=seg), *a))(q, k, v, w)
    want = jax.jit(lambda *a: values_and_grads(today, *a))(q, k, v, w)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and np.array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


def test_auto_picks_the_kernel_per_platform_dtype_and_shape():
    pick = lambda platform, kind="", dtype=jnp.bfloat16, K=64, T=1024: choose_kernel(
        "auto", platform=platform, device_kind=kind, dtype=dtype, K=K, T=T)
    assert pick("tpu", "TPU v5 lite") == "splash"
    assert pick("tpu", "TPU v5 lite", T=1000) == "xla"  # no block size fits: the fastest correct kernel
    assert pick("gpu", "NVIDIA H100 80GB HBM3") == "cudnn"
    assert pick("gpu", "NVIDIA H100 80GB HBM3", dtype=jnp.float32) == "xla"
    assert pick("gpu", "NVIDIA H100 80GB HBM3", K=160) == "xla"
    assert pick("gpu", "AMD Instinct MI300X") == "xla"
    assert pick("cpu", "cpu") == "xla"


def tpu_mesh(data: int = 1, tensor: int = 1) -> AbstractMesh:
    """What `sharding.on_mesh` installs when the step is traced for TPU devices, compile-only ones included."""
    return AbstractMesh((data, 1, tensor), AXES, axis_types=(AxisType.Auto,) * 3,
                        abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


def operand_specs(jaxpr) -> list[tuple]:
    """The shard_map's specs of q, k, v (B,H,T,K) and segment ids (B,T); its other operands are
    the kernel's mask tables, replicated."""
    (shmap,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    return [tuple(s) for s, x in zip(shmap.params["in_specs"], shmap.invars) if x.aval.shape[:1] == (B,)]


def test_auto_traced_for_a_tpu_mesh_runs_splash_per_device_shard():
    """The platform comes from the mesh being traced for, not from this CPU host: auto is splash,
    inside a shard_map that splits batch rows over data x fsdp and heads over tensor."""
    q, k, v, _ = qkv_and_cotangent(jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(tpu_mesh(data=2, tensor=2)):
        jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, segment_ids=segments()))(q, k, v)
    assert "pallas_call" in str(jaxpr)
    assert operand_specs(jaxpr) == [(("data", "fsdp"), "tensor", None, None)] * 3 + [(("data", "fsdp"), None)]
    with jax.sharding.use_abstract_mesh(tpu_mesh(tensor=4)):  # 2 heads cannot split 4 ways: replicated
        jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v))(q, k, v)
    assert operand_specs(jaxpr) == [(("data", "fsdp"), None, None, None)] * 3
    assert "pallas_call" not in str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v))(q, k, v))  # CPU: xla


def gpu_mesh() -> AbstractMesh:
    return AbstractMesh((1, 1, 1), AXES, axis_types=(AxisType.Auto,) * 3,
                        abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                       platform="gpu"))


def test_cudnn_call_is_causal_with_the_document_mask_only(monkeypatch):
    """jax traces cuDNN attention only where the cuDNN library is loaded, so the call `attend`
    makes is recorded instead: causal in cuDNN itself, the document mask as segment equality."""
    calls = []

    def record(q, k, v, **kw):
        calls.append(kw)
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q, k, v, _ = qkv_and_cotangent(jnp.bfloat16)
    seg = segments()
    with jax.sharding.use_abstract_mesh(gpu_mesh()):
        attend(q, k, v, segment_ids=seg, kernel="cudnn")
        attend(q, k, v, kernel="auto")
        attend(q.astype(jnp.float32), k, v, kernel="auto")  # float32: cuDNN has no flash kernel
        with pytest.raises(ConfigError, match="model.attention=cudnn needs model.dtype=bfloat16"):
            attend(q.astype(jnp.float32), k, v, kernel="cudnn")
    (doc, plain, f32) = calls
    assert (doc["implementation"], doc["is_causal"], plain["implementation"], plain["is_causal"]) == (
        "cudnn", True, "cudnn", True)
    assert plain["mask"] is None
    assert doc["mask"].shape == (B, 1, T, T)
    assert np.array_equal(doc["mask"], np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :])
    assert f32["implementation"] == "xla"


def test_kernels_that_cannot_run_here_are_refused_in_one_line():
    q, k, v, _ = qkv_and_cotangent(jnp.bfloat16)
    with pytest.raises(ConfigError, match=r"^model.attention=cudnn needs an NVIDIA GPU \(the devices here: cpu\)"):
        attend(q, k, v, kernel="cudnn")
    with pytest.raises(ConfigError, match="^model.attention=splash needs a TPU"):
        attend(q, k, v, kernel="splash")


def test_an_explicit_kernel_refuses_attention_dropout():
    cfg = tiny_model_config(attention="splash", attn_pdrop=0.1)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: GPT2(cfg).init(jax.random.key(0), tokens))
    with pytest.raises(ConfigError, match="model.attention=splash has no attention dropout; set model.attn_pdrop=0"):
        jax.eval_shape(lambda p: GPT2(cfg).apply(p, tokens, deterministic=False,
                                                 rngs={"dropout": jax.random.key(1)}), params)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(LIBTPU), reason="FLAX_GPT_TEST_LIBTPU (a libtpu.so) not set")
def test_the_train_step_with_auto_attention_compiles_splash_for_a_tpu_slice():
    """On a CPU host, the step traced for compile-only TPU devices takes splash (a Mosaic custom
    call in the lowered module) with the document mask, and XLA:TPU compiles it without copying
    q, k, v or the attention output between layouts."""
    script = textwrap.dedent("""
        import json
        import re
        from flax_gpt.bench.tpu_compile import topology_devices
        from flax_gpt.config_files import load_config
        from flax_gpt.train.state import StateBuilder
        cfg = load_config("configs/tiny.yaml", ["model.attn_pdrop=0", "model.dtype=bfloat16", "data.seq_len=256",
                                                "model.n_positions=256", "data.document_mask=true",
                                                "model.remat=save_attention"])
        _, _, devices = topology_devices("v5e:2x2")
        b = StateBuilder(cfg, 10, devices=devices)
        lowered = b.step_fn.lower(b.abstract, b.abstract_batch())
        text = lowered.as_text()
        compiled = lowered.compile().as_text()
        kernels = sorted({n for n in re.findall(r"splash_mha_\\w+", text)})
        # copies the compiled step runs outside fusions (the entry computation), by output dims
        entry = compiled[compiled.index("ENTRY"):]
        entry = entry[:entry.index("\\n}")]
        copies = [sorted(map(int, d.split(","))) for d in re.findall(r"= \\w+\\[([\\d,]+)\\]\\S* copy\\(", entry)]
        m = cfg.model
        qkv = sorted([cfg.train.batch_size // len(devices), m.n_head, cfg.data.seq_len, m.n_embd // m.n_head])
        forward_calls = len(re.findall(r"%splash_mha_fwd\\w* = ", re.sub(r"\\.\\d+ = ", " = ", compiled)))
        print(json.dumps({"mosaic": text.count("tpu_custom_call"), "kernels": kernels, "attention": cfg.model.attention,
                          "qkv_copies": sum(c == qkv for c in copies), "copies": len(copies),
                          "forward_calls": forward_calls, "layers": m.n_layer}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env.update(JAX_PLATFORMS="cpu", TPU_LIBRARY_PATH=LIBTPU)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # The forward kernel (saving its residuals) and the two backward ones, all with segment ids;
    # the lowering shares each kernel's body between the layers.
    assert res["attention"] == "auto" and res["mosaic"] >= 3, res
    assert res["kernels"] == ["splash_mha_dkv_segmented_no_residuals", "splash_mha_dq_segmented_no_residuals",
                              "splash_mha_fwd_segmented_residuals"], res
    # model.remat=save_attention keeps the forward kernel's output and statistics for the backward
    # pass: the compiled step runs it once per layer (full remat: twice, the block recomputed whole)
    assert res["forward_calls"] == res["layers"], res
    # q, k, v and the output reach and leave the kernel in its head-major layout: not one
    # activation of theirs is copied between layouts (before the head-major projections: 4+ per layer)
    assert res["copies"] > 0 and res["qkv_copies"] == 0, res


def test_head_major_projections_are_hf_conv1d_laid_out_for_the_kernel():
    """gpt2.HeadsConv1D (the splash path's c_attn and c_proj) takes Conv1D's own parameters and
    gives the same products, only with heads as axes: c_attn's q|k|v as (3,B,H,T,K), c_proj
    reading (B,H,T,K). Values agree to float32 summation order."""
    from flax_gpt.model.gpt2 import Conv1D, HeadsConv1D

    B_, T_, H_, K_ = 2, 8, 4, 16
    D = H_ * K_
    x = jax.random.normal(jax.random.key(0), (B_, T_, D))
    plain = Conv1D(3 * D, ("embed", "qkv"), jnp.float32)
    params = plain.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), nn.unbox(params))
    qkv = plain.apply(params, x).reshape(B_, T_, 3, H_, K_).transpose(2, 0, 3, 1, 4)
    q, k, v = HeadsConv1D(3 * D, ("embed", "qkv"), jnp.float32, H_, first_scale=0.25).apply(params, x)
    np.testing.assert_allclose(np.asarray(jnp.stack([q / 0.25, k, v])), np.asarray(qkv), rtol=1e-5, atol=1e-5)
    o = jax.random.normal(jax.random.key(3), (B_, H_, T_, K_))
    proj = Conv1D(D, ("heads", "embed"), jnp.float32)
    pp = jax.tree.map(lambda p: p + 0.1, nn.unbox(proj.init(jax.random.key(4), x)))
    want = proj.apply(pp, o.transpose(0, 2, 1, 3).reshape(B_, T_, D))
    got = HeadsConv1D(D, ("heads", "embed"), jnp.float32, H_).apply(pp, o)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
