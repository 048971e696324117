"""The command line itself: overrides anywhere after the verb, and which export `train` may replace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flax_gpt import storage
from flax_gpt.cli import main, parse_args
from flax_gpt.config_files import load_config
from flax_gpt.errors import ConfigError, OutputError
from flax_gpt.pipeline import check_outputs

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("argv", [
    ["train", TINY, "train.steps=5", "--overwrite-data", "train.seed=3"],
    ["train", TINY, "--overwrite-data", "train.steps=5", "train.seed=3"],
    ["train", TINY, "--num-processes", "1", "train.steps=5", "--process-id", "0", "train.seed=3"],
])
def test_overrides_may_stand_before_or_after_flags(argv):
    args = parse_args(argv)
    assert args.overrides == ["train.steps=5", "train.seed=3"] and args.config == TINY
    cfg = load_config(args.config, args.overrides)
    assert (cfg.train.steps, cfg.train.seed) == (5, 3)


def test_an_override_after_a_flag_reaches_the_config(capsys):
    assert main(["config", TINY, "--explain", "train.steps=7"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("train.steps"))
    assert "7" in line.split()[1]


@pytest.mark.parametrize("argv,needle", [
    (["train", TINY, "train.steps=5", "--nope"], "unrecognized arguments: --nope"),
    (["eval", "run", "train.steps=5"], "unrecognized arguments: train.steps=5"),  # eval takes no config
])
def test_unknown_words_are_still_refused(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_args(argv)


def _cfg(tmp_path, run: str, export: str):
    return load_config(TINY, [f"train.run_dir={tmp_path / run}", f"train.export_dir={tmp_path / export}",
                              f"data.shards_dir={tmp_path / 'shards'}"])


def _fake_export(folder: Path, origin: Path | None) -> None:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    storage.mark(folder, "export", **({"origin": str(origin)} if origin else {}))


def test_train_replaces_its_own_export_but_not_another_runs(tmp_path):
    pytest.importorskip("torch")  # the export step's requirement, checked up front too
    _fake_export(tmp_path / "mine", tmp_path / "a")
    _fake_export(tmp_path / "theirs", tmp_path / "b")
    _fake_export(tmp_path / "unknown", None)  # an export that does not record its run
    assert check_outputs(_cfg(tmp_path, "a", "mine")) is False  # a new run, its own export: fine
    for other in ("theirs", "unknown"):
        with pytest.raises(OutputError, match="already holds an export of .*--overwrite.*train.export_dir"):
            check_outputs(_cfg(tmp_path, "a", other))
        check_outputs(_cfg(tmp_path, "a", other), overwrite_export=True)
    assert storage.marker_of(tmp_path / "theirs")["origin"] == str(tmp_path / "b")  # checks never write


SLOW_COMPILE = """
import signal, sys, time
import jax, jax.numpy as jnp
from flax_gpt.process import wait_interruptibly

handled = []
signal.signal(signal.SIGTERM, lambda *_: handled.append(time.monotonic()))

def deep(x):  # hundreds of unrolled layers: seconds of XLA compilation, no Python in between
    for i in range(400):
        x = jnp.tanh(x @ x.T + i) @ x
    return x

lowered = jax.jit(deep).lower(jnp.ones((8, 8)))
print("compiling", flush=True)
done = []
wait_interruptibly(lambda: (lowered.compile(), done.append(time.monotonic())))
print("handled during the compile" if handled and handled[0] < done[0] else "handled after the compile", flush=True)
"""


def test_a_signal_is_handled_while_xla_compiles(tmp_path):
    """SIGTERM (or Ctrl-C) during a long compile runs its handler at once, not when XLA returns."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPILE], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "compiling"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert out.strip() == "handled during the compile"
