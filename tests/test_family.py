"""The model-family seam: a Llama-architecture model chosen by config trains through the CLI, exports
to a folder transformers' LlamaForCausalLM loads with our logits, imports back bit for bit, and
generates greedily as transformers does; and no module outside flax_gpt/model/ names a family's
classes or parameters."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_gpt.config_files import load_config
from flax_gpt.errors import ConfigError
from flax_gpt.generate import generate_tokens
from flax_gpt.model.family import FAMILIES, load_hf, model
from flax_gpt.train.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
LOGIT_TOL = 1e-4  # float32: the parity bound both families are held to

# A 2-layer, 64-wide Llama (4 query heads sharing 2 key/value heads, untied head) on GPT-2's vocab.
LLAMA = ["model.preset=tiny-llama", "model.n_positions=64", "data.synthetic_docs=200", "data.seq_len=32",
         "train.batch_size=4", "train.steps=4", "train.eval_every=0", "train.progress=false",
         "checkpoint.every=0", "checkpoint.async_save=false", "optim.learning_rate=3e-3"]


def _cli(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """(run dir, export folder) of a tiny Llama trained 4 steps and exported, all through the CLI."""
    tmp = tmp_path_factory.mktemp("llama")
    run, out = tmp / "run", tmp / "export"
    r = _cli("train", TINY, *LLAMA, f"train.run_dir={run}", f"data.shards_dir={tmp / 'shards'}")
    assert r.returncode == 0, r.stderr
    r = _cli("export", run, "--out", out)
    assert r.returncode == 0, r.stderr
    return run, out


def test_a_llama_preset_selects_the_family():
    cfg = load_config(TINY, ["model.preset=smollm2-135m"]).model
    assert (cfg.family, cfg.n_kv_head, cfg.tie_word_embeddings, cfg.n_positions) == ("llama", 3, True, 8192)
    assert load_config(TINY).model.family == "gpt2"  # a GPT-2 config is unchanged
    assert FAMILIES["llama"].presets == ("smollm2-135m", "tinyllama-1.1b", "tiny-llama")


@pytest.mark.parametrize("overrides, message", [
    (["model.family=llama"], "has no dropout"),  # tiny.yaml's dropout is GPT-2's
    (["model.n_kv_head=2"], "apply to model.family=llama only"),
    (["model.preset=tiny-llama", "model.n_kv_head=3"], "not a multiple of model.n_kv_head=3"),
])
def test_family_fields_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_a_llama_run_trains_through_the_cli(llama_run):
    run, _ = llama_run
    cfg, params, step, _ = RunDir(run).load_params()
    assert (cfg.model.family, step) == ("llama", 4)
    assert "lm_head" in params and "embed_tokens" in params  # the untied Llama layout, not GPT-2's


def test_the_export_loads_in_transformers_with_our_logits(llama_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run, out = llama_run
    cfg, params, _, _ = RunDir(run).load_params()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    ours = np.asarray(model(cfg.model).apply({"params": params}, tokens))[..., : cfg.model.vocab_size]
    assert np.max(np.abs(ours - theirs)) < LOGIT_TOL
    # And back: the import of the export is the run's parameters, bit for bit.
    hf_cfg, imported = load_hf(str(out))
    assert hf_cfg.family == "llama" and hf_cfg.n_kv_head == cfg.model.n_kv_head
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(jax.device_get(params))):
        assert np.array_equal(a, b)


def test_a_bfloat16_checkpoint_imports(llama_run, tmp_path):
    """Llama-family checkpoints are mostly stored in bfloat16 (SmolLM2, TinyLlama)."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    _, out = llama_run
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    (bf16 / "config.json").write_text((out / "config.json").read_text())
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(out / "model.safetensors")).items()}
    save_file(sd, str(bf16 / "model.safetensors"))
    cfg, params = load_hf(str(bf16))
    want = sd["model.layers.0.mlp.down_proj.weight"].astype(np.float32).T
    got = params["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert cfg.family == "llama" and got.dtype == np.float32 and np.array_equal(got, want)


def test_greedy_generation_matches_transformers(llama_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run, out = llama_run
    cfg, params, _, _ = RunDir(run).load_params()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.model.vocab_size, n).tolist() for n in (3, 11)]
    eos = 50256  # GPT-2's separator, the run's tokenizer's; both stop at it, ours strips it
    ours = generate_tokens(params, cfg.model, prompts, max_new_tokens=10, greedy=True, eos_id=eos)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=eos, eos_token_id=eos)[0, len(prompt):].tolist()
        assert got == (want[: want.index(eos)] if eos in want else want)
        assert len(got) > 0


# ----------------------------------------------------------------------------- the seam holds

# Names of one family's classes and parameters, and imports of a family's own modules.
FAMILY_NAMES = re.compile(r"\bwte\b|\bwpe\b|\bGPT2(LMHeadModel|Config|Model)?\b|\bLlama(ForCausalLM|Config)\b"
                          r"|flax_gpt\.model\.(gpt2|llama|llama_hf)\b|from flax_gpt\.model import .*\b(gpt2|llama)\b")
# Modules outside flax_gpt/model/ still allowed a family name, each with its reason. Empty: GPT-2's
# tokenizer (data/tokenizer.py: GPT2Tokenizer, GPT2_EOS_ID) is a tokenizer, not a model family.
ALLOWED: dict[str, str] = {}


def _code_only(source: str) -> str:
    """The module's code without comments and docstrings (what the seam rule is about)."""
    kept, prev = [], tokenize.INDENT
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        docstring = tok.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT)
        if tok.type not in (tokenize.COMMENT, tokenize.NL) and not docstring:
            kept.append(tok.string)
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.type
    return " ".join(kept)


def test_no_family_names_outside_the_model_package():
    found = {}
    for path in sorted((ROOT / "flax_gpt").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("flax_gpt/model/") or rel in ALLOWED:
            continue
        hits = sorted({m.group(0) for m in FAMILY_NAMES.finditer(_code_only(path.read_text()))})
        if hits:
            found[rel] = hits
    assert found == {}


def test_the_seam_rule_sees_code_not_comments():
    assert FAMILY_NAMES.search(_code_only("x = params['wte']\n"))
    assert FAMILY_NAMES.search(_code_only("from flax_gpt.model.gpt2 import GPT2\n"))
    assert not FAMILY_NAMES.search(_code_only('"""The wte table."""\nx = 1  # GPT2 wpe\n'))
