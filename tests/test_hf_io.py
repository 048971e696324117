"""import-hf -> export round trip, transformers reload, and the user errors of both verbs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import tiny_model_config, torch_reference

from flax_gpt.cli import main

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "ref"
    torch_reference(tiny_model_config()).save_pretrained(folder)
    return folder


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *map(str, args)], capture_output=True, text=True)


def test_import_export_round_trip_is_bit_exact(hf_folder, tmp_path):
    from safetensors.numpy import load_file
    from transformers import GPT2LMHeadModel

    run = tmp_path / "run"
    assert main(["import-hf", str(hf_folder), "--out", str(run)]) == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "0").is_dir()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["init_from"] == str(hf_folder)

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    original = load_file(str(hf_folder / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(original) - {"lm_head.weight"}
    for name, value in exported.items():
        assert value.dtype == np.float32 and np.array_equal(value, original[name]), name
    _model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_export_never_replaces_a_folder_it_did_not_write(hf_folder, tmp_path):
    run = tmp_path / "run"
    assert main(["import-hf", str(hf_folder), "--out", str(run)]) == 0
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # a foreign folder is refused, --overwrite or not
        r = _cli("export", run, "--out", out, *extra)
        assert r.returncode == 2 and "not written by flax-gpt" in r.stderr and "keep.txt" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    assert main(["export", str(run), "--out", str(mine)]) == 0
    r = _cli("export", run, "--out", mine)  # an earlier export is replaced only when asked
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert main(["export", str(run), "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "model.safetensors").is_file()


def test_export_check_catches_an_unfaithful_export(hf_folder, tmp_path, monkeypatch):
    """The reload check compares real logits: a corrupted weight fails it and nothing is written."""
    from flax_gpt import pipeline
    from flax_gpt.errors import HFError
    from flax_gpt.export import hf_folder as export_mod

    run = tmp_path / "run"
    pipeline.import_hf(str(hf_folder), run)
    real = export_mod.to_hf

    def corrupt(params, cfg, eos_id=None):
        hf_cfg, sd = real(params, cfg, eos_id)
        sd["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"] + 0.5
        return hf_cfg, sd

    monkeypatch.setattr(export_mod, "to_hf", corrupt)
    with pytest.raises(HFError, match="export check failed"):
        export_mod.export_run(run, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("case", ["missing", "unknown_family", "llama_keys", "shape", "no_weights"])
def test_import_errors_are_one_line(case, hf_folder, tmp_path):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
        cfg = json.loads((hf_folder / "config.json").read_text())
        if case == "unknown_family":
            cfg["model_type"] = "bert"
        if case == "llama_keys":  # a Llama config.json needs Llama's keys
            cfg["model_type"] = "llama"
        if case == "shape":
            cfg["n_embd"] = 32
        (src / "config.json").write_text(json.dumps(cfg))
        if case != "no_weights":
            (src / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    r = _cli("import-hf", src, "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    expected = {"missing": "not found", "unknown_family": "model_type='bert'",
                "llama_keys": "not a complete LlamaForCausalLM config", "shape": "shape", "no_weights": "safetensors"}
    assert expected[case] in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_key_names_the_closest(tmp_path):
    r = _cli("prepare", "configs/tiny.yaml", "train.stpes=5")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'train.stpes'; did you mean 'train.steps'?"


def test_overrides_take_yaml_values_and_plain_strings():
    from flax_gpt.config_files import build_config

    cfg = build_config({}, ['data.template="{title}\\n{abstract}"', "data.text_column={weird", "train.steps=7",
                            'data.source=["a.csv", "b.csv"]'])
    assert cfg.data.template == "{title}\n{abstract}" and cfg.data.text_column == "{weird"
    assert cfg.train.steps == 7 and cfg.data.source == ["a.csv", "b.csv"]
