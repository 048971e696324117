"""Each config field declares itself once; the resume check, the model card and `config --explain`
all read that declaration."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from flax_gpt.config import RESULT, RUN, SECTIONS, Config, ModelConfig
from flax_gpt.config_files import build_config
from flax_gpt.errors import ConfigError
from flax_gpt.export.card import card_settings
from flax_gpt.model.flops import param_count
from flax_gpt.train.run_dir import check_resume_compatible

ROOT = Path(__file__).resolve().parents[1]


def _all_fields():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def test_every_field_declares_meaning_and_effect():
    for section, f in _all_fields():
        assert f.metadata["doc"].strip(), f"{section}.{f.name} has no meaning"
        assert f.metadata["effect"] in (RESULT, RUN), f"{section}.{f.name}"


def test_config_explain_lists_every_key_with_its_meaning():
    r = subprocess.run([sys.executable, "-m", "flax_gpt.cli", "config", "configs/tiny.yaml", "train.steps=7",
                        "--explain"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {f"{s}.{f.name}" for s, f in _all_fields()}
    assert "7" in rows["train.steps"] and "(default 100)" in rows["train.steps"]
    assert " result " in rows["optim.learning_rate"] and " run " in rows["mesh.fsdp"]
    assert "exponential | cosine" in rows["optim.schedule"]


def test_resume_check_follows_the_declared_effect():
    old = build_config({"optim": {"learning_rate": 1e-3}, "train": {"steps": 100}})
    check_resume_compatible(old, old.replace(mesh={"fsdp": 2}, checkpoint={"keep": 9}, train={"steps": 200}))
    for section, f in _all_fields():
        if f.metadata["effect"] != RESULT or f.name == "preset" or f.metadata["choices"]:
            continue
        value = getattr(getattr(old, section), f.name)
        changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2 + 1,
                   str: lambda v: v + "x"}.get(type(value), lambda v: "other")(value)
        new = old.replace(**{section: {f.name: changed}})
        with pytest.raises(ConfigError, match=f"{section}.{f.name}"):
            check_resume_compatible(old, new)


def test_run_length_is_part_of_the_result_when_the_schedule_uses_it():
    cosine = build_config({"optim": {"schedule": "cosine"}, "train": {"steps": 100}})
    with pytest.raises(ConfigError, match="train.steps=100"):
        check_resume_compatible(cosine, cosine.replace(train={"steps": 200}))
    expo = build_config({"train": {"steps": 100}})
    check_resume_compatible(expo, expo.replace(train={"steps": 200}))  # exponential ignores the run length


def test_model_card_table_is_the_card_declarations():
    cfg = build_config({"model": {"preset": "tiny"}, "train": {"batch_size": 16}})
    labels = [label for label, _ in card_settings(cfg)]
    declared = [f.metadata["card"] for _, f in _all_fields() if f.metadata["card"]]
    assert labels == [d for d in declared if d in labels] and "batch size (sequences)" in labels
    assert dict(card_settings(cfg))["batch size (sequences)"] == "16"


def test_model_config_defaults_are_gpt2_124m():
    assert ModelConfig().preset == "gpt2" and param_count(ModelConfig()) == 124_439_808
    assert Config().model == build_config({}).model


@pytest.mark.parametrize("raw,needle", [
    ({"train": 5}, "config section 'train' must be a mapping"),
    ({"train": {"steps": 0, "epochs": 0}}, "ask for no training"),
    ({"optim": {"schedule": "cosin"}}, "optim.schedule='cosin' is not one of"),
    ({"trian": {}}, "did you mean 'train'"),
    ({"train": {"profile_steps": "5"}}, "START:END"),
])
def test_bad_configs_are_one_clear_error(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(raw)


def test_colon_values_stay_text_in_overrides_and_files(tmp_path):
    """YAML 1.1 reads 2:4 as the base-60 number 124; a START:END setting must stay what was typed."""
    from flax_gpt.config_files import load_config

    assert build_config({}, ["train.profile_steps=2:4"]).train.profile_steps == "2:4"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  profile_steps: 10:15\n  steps: 30\noptim:\n  learning_rate: 3.0e-4\n")
    cfg = load_config(str(f), [])
    assert (cfg.train.profile_steps, cfg.train.steps, cfg.optim.learning_rate) == ("10:15", 30, 3e-4)


def test_a_checkpoint_must_match_every_architecture_field_and_only_those():
    """The fields declared `architecture=True` are the ones a restored or imported model is checked
    against: each one that differs is named in one line; a field that does not shape the parameters
    (dropout, dtype, remat) may differ."""
    from flax_gpt.train.run_dir import check_same_architecture

    base = build_config(overrides=["model.preset=tiny-llama"]).model
    assert set(base.architecture()) == {"family", "n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner",
                                        "pad_vocab_to", "n_kv_head", "head_dim", "rope_theta", "tie_word_embeddings"}
    check_same_architecture(base, dataclasses.replace(base, attn_pdrop=0.3, dtype="bfloat16", remat="full"), "ckpt")
    for name, value in [("n_kv_head", 4), ("rope_theta", 500000.0), ("tie_word_embeddings", True)]:
        with pytest.raises(ConfigError, match=rf"ckpt has model.{name}={value} but the config says model.{name}="):
            check_same_architecture(base, dataclasses.replace(base, **{name: value}), "ckpt")
