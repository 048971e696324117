"""The fused Pallas cross-entropy (`model/loss_kernel.py`), run here in Pallas' interpreter (the TPU
kernels' own code, executed on CPU), against the chunked loss of `model/loss.py`: loss and
gradients with several token and vocab blocks, padded vocabulary rows and the loss mask; which
kernel runs where; and, with libtpu, that XLA:TPU compiles the kernels and counts their work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from test_attention import tpu_mesh  # the abstract mesh traced for TPU devices

from flax_gpt.model import loss_kernel
from flax_gpt.model.loss import choose_kernel, cross_entropy_sums

U32 = 2.0**-24
LIBTPU = os.environ.get("FLAX_GPT_TEST_LIBTPU", "")


def _inputs(B, T, D, V, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (B, T, D)).astype(dtype)
    e = jax.random.normal(k[1], (V, D)) * 0.3
    vocab_size = V - 7  # padded rows beyond it take no part
    t = jax.random.randint(k[2], (B, T), 0, vocab_size)
    w = (jax.random.uniform(k[3], (B, T)) > 0.2).astype(jnp.float32)
    return h, e, t, w, vocab_size


def _value_and_grads(kernel, h, e, t, w, vocab_size):
    f = lambda h, e, w: cross_entropy_sums(h, e, t, w, vocab_size=vocab_size, kernel=kernel, interpret=True)[0]
    return jax.value_and_grad(f, argnums=(0, 1, 2))(h, e, w)


@pytest.mark.parametrize("B,T,V", [(3, 128, 1100), (2, 256, 640)])
def test_fused_kernels_match_the_chunked_loss_and_gradients(B, T, V):
    """(3,128): three token blocks of 128 and a vocab that fills neither 512 nor 1024 (zero-padded
    rows); (2,256): one block of 512 tokens. float32 compute, so both sides differ only in the
    order of their float32 sums: bounded by (D + log2 V) roundings of the largest term."""
    D = 64
    h, e, t, w, vocab_size = _inputs(B, T, D, V, jnp.float32)
    (loss_f, grads_f), (loss_c, grads_c) = (_value_and_grads(k, h, e, t, w, vocab_size) for k in ("pallas", "chunked"))
    logits = jnp.einsum("btd,vd->btv", h, e)
    big = float(jnp.max(jnp.abs(logits)))  # the largest logit: every NLL is a sum of such terms
    n = int(jnp.sum(w))
    assert abs(float(loss_f) - float(loss_c)) <= 4 * (D + math.log2(V)) * U32 * big * n
    dh_f, de_f, dw_f = grads_f
    dh_c, de_c, dw_c = grads_c
    # dh = sum_v dl_v e_v with sum_v |dl_v| <= 2: each term's error is a few roundings of max|e|
    # times the sum's length; dE sums the same over the tokens (|h| for |e|).
    bound = lambda scale, terms: 4 * (D + terms + math.log2(V)) * U32 * scale * 2
    assert float(jnp.max(jnp.abs(dh_f - dh_c))) <= bound(float(jnp.max(jnp.abs(e))), V)
    assert float(jnp.max(jnp.abs(de_f - de_c))) <= bound(float(jnp.max(jnp.abs(h))), B * T) * n
    assert float(jnp.max(jnp.abs(dw_f - dw_c))) <= 4 * (D + math.log2(V)) * U32 * big
    # padded vocabulary rows get no gradient, masked tokens none either
    assert not np.any(np.asarray(de_f[vocab_size:]))
    assert not np.any(np.asarray(dh_f)[np.asarray(w) == 0])


def test_bfloat16_compute_is_the_chunked_loss_bit_for_bit_on_one_block():
    """In bf16 both take the same float32-accumulated tile products and round dlogits to bf16 the
    same way; on one token block and one vocab block even the sums' order agrees."""
    h, e, t, w, vocab_size = _inputs(1, 128, 64, 500, jnp.bfloat16, seed=3)
    (loss_f, grads_f), (loss_c, grads_c) = (_value_and_grads(k, h, e, t, w, vocab_size) for k in ("pallas", "chunked"))
    assert float(loss_f) == pytest.approx(float(loss_c), rel=64 * U32)
    for a, b in zip(grads_f, grads_c):
        assert np.allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2**-7, atol=2**-7 * float(
            jnp.max(jnp.abs(b.astype(jnp.float32))))), "bf16 gradients differ by more than one bf16 rounding"


def test_the_kernel_runs_on_tpu_per_device_and_the_chunked_loop_elsewhere():
    h, e, t, w, vocab_size = _inputs(4, 128, 64, 640, jnp.bfloat16)
    f = lambda h, e: cross_entropy_sums(h, e, t, w, vocab_size=vocab_size)[0]
    grad = jax.grad(f, argnums=(0, 1))
    with jax.sharding.use_abstract_mesh(tpu_mesh(data=2)):
        text = str(jax.make_jaxpr(grad)(h, e))
    assert text.count("pallas_call") == 3 and "shard_map" in text  # forward, grad_h, grad_head
    # each device's dE comes out stacked over the batch shards and is summed outside the kernels
    assert "psum" not in text and "reduce_sum[axes=(0,)" in text
    with jax.sharding.use_abstract_mesh(tpu_mesh(tensor=2)):  # vocabulary split over devices: the loop
        assert "pallas_call" not in str(jax.make_jaxpr(grad)(h, e))
    assert "pallas_call" not in str(jax.make_jaxpr(grad)(h, e))  # this CPU: the loop


def test_kernel_choice():
    pick = lambda kernel, platform="tpu", B=4, T=1024, S=2, tp=1: choose_kernel(
        kernel, platform=platform, B=B, T=T, batch_shards=S, vocab_shards=tp)
    assert pick("auto") == "pallas"
    assert pick("auto", platform="gpu") == pick("auto", platform="cpu") == "chunked"
    assert pick("auto", tp=2) == pick("auto", B=3) == pick("auto", B=2, T=100, S=1) == "chunked"
    assert pick("chunked") == "chunked"
    with pytest.raises(ValueError, match="needs a TPU"):
        pick("pallas", platform="cpu")
    with pytest.raises(ValueError, match="unsplit vocabulary"):
        pick("pallas", tp=2)
    assert loss_kernel.token_block(4096) == 1024 and loss_kernel.token_block(384) == 128
    assert loss_kernel.token_block(100) is None
    # grad_head's float32 output tile stays within GPT-2's 1024 x 768 as models widen
    assert [loss_kernel.head_vocab_block(d) for d in (64, 768, 1024, 1280, 1600, 8192)] == [1024, 1024, 512, 512, 256,
                                                                                           128]


COMPILE = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax_gpt.bench.roofline import hidden_bytes
from flax_gpt.bench.tpu_compile import topology_devices
from flax_gpt.model.loss import cross_entropy_sums
from flax_gpt.sharding import AXES, on_mesh
_, _, (dev, *_) = topology_devices(TOPOLOGY)
mesh = Mesh(np.array([dev]).reshape(1, 1, 1), AXES)  # traced for the TPU, as the train step is
T, D, V = 1024, 768, 50304
s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P()))
f = jax.value_and_grad(lambda h, e, t, w: cross_entropy_sums(h, e, t, w, vocab_size=50257)[0], argnums=(0, 1))
c = jax.jit(on_mesh(f, mesh)).lower(s((B, T, D), jnp.bfloat16), s((V, D), jnp.float32), s((B, T), jnp.int32),
                     s((B, T), jnp.float32)).compile()
ca = c.cost_analysis()
ca = ca[0] if isinstance(ca, (list, tuple)) else ca
text = c.as_text()
print(json.dumps({"flops": ca["flops"], "bytes": ca["bytes accessed"], "mosaic": text.count('"tpu_custom_call"'),
                  "temp": c.memory_analysis().temp_size_in_bytes, **hidden_bytes(text)}))
"""


def _compile_loss(topology: str, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env.update(JAX_PLATFORMS="cpu", TPU_LIBRARY_PATH=LIBTPU)
    script = f"TOPOLOGY, B = {topology!r}, {batch}\n" + textwrap.dedent(COMPILE)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(LIBTPU), reason="FLAX_GPT_TEST_LIBTPU (a libtpu.so) not set")
@pytest.mark.parametrize("topology", ["v5e-1", "v4-8"])
def test_xla_tpu_compiles_the_kernels_and_counts_their_work(topology):
    """GPT-2's head at T=1024 on a v5e chip and a v4 core (16 MiB of VMEM: the tiles must fit it):
    the three kernels compile; XLA's cost analysis takes their estimates (all 10 N V D FLOPs of the
    forward and the two recomputing backward kernels), so none is left for the roofline to add; no
    (N, V) buffer is planned."""
    res = _compile_loss(topology, 2)
    N, D, V = 2 * 1024, 768, 50304
    assert res["mosaic"] == 3 and res["kernel_calls"] == 0 and res["kernels"] == 0, res  # each has its estimate
    assert res["flops"] >= 10 * N * V * D, res
    # the largest temporary is the float32 dE of the head (padded to 51200 rows), not logits
    assert res["temp"] <= 1.1 * 51200 * D * 4 < N * V * 4 / 2, res
