"""The README as a newcomer follows it (a README doctest): its code blocks are read in order, and
the ones marked `<!-- readme-test -->` run as written, each after the ones before it, in a fresh
folder beside the project's configs. The install steps of a command (`python3 -m venv`, activating,
`pip install`) are what this test environment already did, so they are left out; everything else
runs unchanged. `tensorboard --logdir D` is a server: it runs with `--inspect` added, which reads
the same event files and exits. Every other `flax-gpt` command in the README is checked against the
CLI's parser, so a renamed verb or flag cannot stay documented."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flax_gpt.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- readme-test -->\s*\n)?```(bash|python)\n(.*?)```", re.S)
INSTALL_STEPS = ("python3 -m venv", ". .venv/bin/activate", "source .venv/bin/activate", "pip install")


def readme_blocks() -> list[tuple[bool, str, str]]:
    """(runs in the doctest, language, code) of every bash/python block, in README order."""
    text = (ROOT / "README.md").read_text()
    return [(bool(mark), lang, code) for mark, lang, code in BLOCK.findall(text)]


def shell_commands(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments dropped, `a && b` split."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


def test_every_documented_flax_gpt_command_parses():
    commands = [c for _, lang, code in readme_blocks() if lang == "bash" for c in shell_commands(code)]
    verbs = [c for c in commands if c.startswith("flax-gpt ")]
    assert len(verbs) >= 10  # the README documents the verbs with examples
    for command in verbs:
        words = [w for w in shlex.split(command)[1:] if "<" not in w]  # <your clone url>-style placeholders
        parse_args(words)  # raises on a verb or flag that does not exist


def test_every_python_snippet_is_valid_python():
    snippets = [code for _, lang, code in readme_blocks() if lang == "python"]
    assert snippets
    for code in snippets:
        ast.parse(code)


@pytest.mark.slow
def test_the_quickstart_runs_as_the_readme_writes_it(tmp_path):
    pytest.importorskip("torch")
    runnable = [(lang, code) for run, lang, code in readme_blocks() if run]
    assert runnable and runnable[0][1].count("flax-gpt train configs/quickstart.yaml") == 1
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    said = {}  # command -> its stdout
    for lang, code in runnable:
        if lang == "python":
            steps = [[sys.executable, "-c", code]]
        else:
            steps = [command + (" --inspect" if command.startswith("tensorboard ") else "")
                     for command in shell_commands(code) if not command.startswith(INSTALL_STEPS)]
        for step in steps:
            r = subprocess.run(step, shell=isinstance(step, str), cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=1200)
            assert r.returncode == 0, (step, r.stdout[-3000:], r.stderr[-3000:])
            assert "Traceback" not in r.stderr, (step, r.stderr[-3000:])
            said[step if isinstance(step, str) else code] = r.stdout
            if isinstance(step, str) and step.startswith("tensorboard "):
                assert "loss" in r.stdout and "val_loss" in r.stdout, r.stdout[-2000:]  # the scalars are there
    trained = said["flax-gpt train configs/quickstart.yaml"]
    assert [line.split(":", 1)[1].strip() for line in trained.splitlines() if line.startswith("--- sample:")] == \
        ["'the role of recommender systems'", "'clustering'", "'transformers for text generation'"]
    best = json.loads(said["flax-gpt eval runs/quickstart --step best"].strip().splitlines()[-1])
    check_quickstart_outputs(tmp_path / "runs" / "quickstart", tmp_path / "exports" / "quickstart", best)


def check_quickstart_outputs(run: Path, export: Path, best: dict) -> None:
    """What the quickstart promises: checkpoints, metrics, TensorBoard events, a report, and an
    export that transformers loads whole."""
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [100, 200]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 201))
    evals = [r for r in records if "val_loss" in r]
    assert [e["step"] for e in evals] == [100, 200] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert best["step"] == 200 and abs(best["val_loss"] - evals[1]["val_loss"]) < 1e-5  # eval agrees with training
    assert list((run / "tb").glob("events.out.tfevents.*"))
    pngs = list((run / "report").glob("*.png"))
    assert len(pngs) >= 8 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (run / "report" / "index.html").is_file()

    from transformers import GPT2LMHeadModel  # deferred: torch, only for this check

    _, info = GPT2LMHeadModel.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "synthetic" in (export / "README.md").read_text().lower()
