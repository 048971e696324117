"""Every config value is checked against its field's declaration (type annotation, `valid` range,
`choices`, `check`) in one place before any work starts: a wrong value is one line naming the key,
the value and the fix, never a traceback and never a silently different value."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from flax_gpt.config import SECTIONS, DataConfig, text_template
from flax_gpt.config_files import build_config, config_from_yaml, explain
from flax_gpt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused_by_cli(folder: Path, *argv: str) -> str:
    """Run the CLI as a user does in `folder`; it must fail with one line and write nothing."""
    before = _files(folder)
    r = subprocess.run([sys.executable, "-m", "flax_gpt.cli", *argv], check=False, cwd=folder, capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert _files(folder) == before
    return lines[0]


@pytest.mark.parametrize("override,needles", [
    ("model.n_layer=yes", ["model.n_layer=True", "not an integer", "yes/no"]),
    ("model.n_layer=1.5", ["model.n_layer=1.5", "not an integer"]),
    ("model.resid_pdrop=1.5", ["model.resid_pdrop=1.5", "[0, 1)"]),
    ("optim.b1=1.5", ["optim.b1=1.5", "[0, 1)"]),
    ("optim.eps=-1", ["optim.eps=-1.0", "(0, inf)"]),
    ("train.log_every=0", ["train.log_every=0", "[1, inf)"]),
    ("train.epochs=nan", ["train.epochs='nan'", "not a finite number"]),
    ("train.run_dir=~", ["train.run_dir has no value", "~"]),
    ("train.sample_prompts=hello", ["train.sample_prompts='hello'", "not a list of strings"]),
    ("data.template={abstract:d}", ["data.template='{abstract:d}'", "format spec :d"]),
    ("data.template={abstract.upper}", ["data.template='{abstract.upper}'", "attribute and index access"]),
])
def test_cli_refuses_a_bad_override_in_one_line_before_writing(tmp_path, override, needles):
    line = _refused_by_cli(tmp_path, "train", TINY, "train.steps=0" if "epochs" in override else "train.steps=2",
                           override)
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("text,needles", [
    (b"model:\n  preset: tiny\n  n_layer:\n", ["model.n_layer has no value", "integer"]),
    (b"train:\n  steps: null\n", ["train.steps has no value"]),
    (b"train:\n  steps: 5\n  seed: 1\n  steps: 6\n", ["'steps' is given twice", "lines 2 and 4", "c.yaml"]),
    (b"data:\n  template: \"caf\xe9 {abstract}\"\n", ["c.yaml", "not UTF-8", "line 2"]),
    (b"train:\n  sample_prompts: 42\n", ["train.sample_prompts=42", "not a list of strings"]),
])
def test_cli_refuses_a_bad_config_file_in_one_line_before_writing(tmp_path, text, needles):
    (tmp_path / "c.yaml").write_bytes(text)
    line = _refused_by_cli(tmp_path, "train", "c.yaml")
    for needle in needles:
        assert needle in line, line


def test_cli_names_a_template_column_missing_from_the_rows(tmp_path):
    (tmp_path / "d.csv").write_text("title,abstract\nA,b c\nD,e f\n")
    line = _refused_by_cli(tmp_path, "prepare", TINY, "data.source=d.csv", "data.template={titel}: {abstract}",
                           "data.shards_dir=shards")
    assert "titel" in line and "['title', 'abstract']" in line


@pytest.mark.parametrize("raw,overrides,needle", [
    ({}, ["model.n_layer=no"], "model.n_layer=False is not an integer"),
    ({}, ["train.progress=1"], "train.progress=1 is not true or false"),
    ({}, ["data.text_column=yes"], "data.text_column=True is not a string"),
    ({"data": {"hf_revision": 1.10}}, [], "data.hf_revision=1.1 is not a string; quote"),
    ({}, ["data.source={a: 1}"], None),  # a mapping is taken as text, so this one is a path (checked later)
    ({"data": {"source": {"a": 1}}}, [], "data.source={'a': 1} is not a string or a list of strings"),
    ({}, ["train.sample_prompts=[a, ~]"], "train.sample_prompts=['a', None] is not a list of strings"),
    ({}, ["train.epochs=.inf", "train.steps=0"], "train.epochs=inf is not a finite number"),
    ({}, ["train.steps=1e12"], "train.steps=1000000000000 is out of range"),
    ({}, ["train.seed=4294967296"], "train.seed=4294967296 is out of range"),
    ({}, ["mesh.data=0"], "mesh.data=0 is out of range; mesh.data takes -1 or [1, inf)"),
    ({}, ["mesh.tensor=-2"], "mesh.tensor=-2 is out of range"),
    ({}, ["optim.weight_decay=-1"], "optim.weight_decay=-1.0 is out of range"),
    ({}, ["train.eval_every=-1"], "train.eval_every=-1 is out of range"),
    ({}, ["model.n_inner=-1"], "model.n_inner=-1 is out of range"),
    ({}, ["model.preset=[tiny]"], "model.preset=['tiny'] is not one of"),
    ({"model": {"remat": 1}}, [], "model.remat='1' is not one of"),
    ({}, ["data.template=plain text"], "data.template='plain text' has no {column} field"),
    ({}, ["data.template={}"], "has a positional field {}"),
    ({}, ["data.template={0}"], "has a positional field {0}"),
    ({}, ["data.template={abstract[0]}"], "attribute and index access"),
    ({}, ["data.template={abstract!r}"], "a conversion does not apply"),
    ({}, ["data.template={abstract"], "is not a valid format string"),
    ({}, ["model.n_embd=100"], "model.n_embd=100 is not divisible by model.n_head=12"),  # rules kept
    ({}, ["data.seq_len=2000"], "data.seq_len=2000 exceeds model.n_positions=1024"),
    ({}, ["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh.data"),
])
def test_build_config_refuses_in_one_line(raw, overrides, needle):
    if needle is None:
        assert build_config(raw, overrides).data.source == "{a: 1}"
        return
    with pytest.raises(ConfigError) as e:
        build_config(raw, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def _numeric_fields():
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                yield section, f, hints[f.name]


def test_every_numeric_field_declares_its_range():
    missing = [f"{s}.{f.name}" for s, f, _ in _numeric_fields() if not f.metadata["valid"]]
    assert missing == []


def _outside(bounds, typ):
    """Values just outside the declared parts (the open ends themselves, one step past the closed ones)."""
    step = 1 if typ is int else 0.5
    for lo, lo_in, hi, hi_in in bounds:
        for x in (lo - step if lo_in else lo, hi + step if hi_in else hi):
            inside = any((a < x or (ai and x == a)) and (x < b or (bi and x == b)) for a, ai, b, bi in bounds)
            if math.isfinite(x) and not inside:
                yield typ(x)


@pytest.mark.parametrize("section,f,typ", list(_numeric_fields()), ids=lambda v: getattr(v, "name", None))
def test_each_declared_range_is_enforced_at_both_ends(section, f, typ):
    key = f"{section}.{f.name}"
    values = list(_outside(f.metadata["bounds"], typ))
    assert values, key
    for value in values:
        with pytest.raises(ConfigError, match=rf"^{key}=.* is out of range; {key} takes "):
            build_config({section: {f.name: value}})


def test_types_follow_the_annotation():
    cfg = build_config({}, ["optim.learning_rate=1", "optim.eps=1e-7", "model.n_layer=4.0", "train.steps=1e3",
                            "train.progress=no", "model.remat=true", "data.source=[a.csv, b.csv]",
                            "train.sample_prompts=[Once upon, 7]"])
    assert type(cfg.optim.learning_rate) is float and cfg.optim.learning_rate == 1.0
    assert cfg.optim.eps == 1e-7 and type(cfg.optim.eps) is float
    assert type(cfg.model.n_layer) is int and cfg.model.n_layer == 4 and cfg.train.steps == 1000
    assert cfg.train.progress is False and cfg.model.remat == "full"  # the legacy value still reads
    assert cfg.data.source == ["a.csv", "b.csv"] and cfg.train.sample_prompts == ["Once upon", "7"]
    assert build_config({"model": {"remat": False}}).model.remat == "none"


def test_a_config_built_in_code_meets_the_same_check():
    with pytest.raises(ConfigError, match=r"data.template='\{abstract:d\}' has \{abstract:d\}"):
        DataConfig(template="{abstract:d}").validate()
    assert DataConfig(template="{title}: {abstract:>5}", seq_len=8).validate().seq_len == 8
    text_template("{title}\n{abstract}")  # the usual template passes


def test_yaml_merge_keys_are_not_duplicates():
    merged = config_from_yaml("train:\n  <<: {steps: 3, seed: 1}\n  steps: 4\n", "text")
    assert (merged.train.steps, merged.train.seed) == (4, 1)
    with pytest.raises(ConfigError, match="text is not valid YAML: key 'seed' is given twice"):
        config_from_yaml("train:\n  <<: {steps: 3}\n  seed: 4\n  seed: 5\n", "text")


def test_explain_shows_each_declared_range():
    rows = {line.split()[0]: line for line in explain(build_config({})).splitlines()[2:]}
    assert "valid: [0, 1)" in rows["optim.b1"] and "valid: -1 or [1, inf)" in rows["mesh.data"]
    assert "valid:" not in rows["data.tokenizer"]
