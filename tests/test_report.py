"""`flax-gpt report` on a real (tiny) training run: every image is a real, non-blank PNG, the page
shows them with the metrics and the escaped samples, and edge cases (no eval, repeated steps,
shards_dir relative to another directory, no metrics file) are handled."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT_CLOUDS = ("wordcloud_the_role_of_recommender_systems.png", "wordcloud_clustering.png",
                 "wordcloud_transformers_for_text_generation.png")
PLOTS = ("loss.png", "perplexity.png", "learning_rate.png", "throughput.png", "corpus_lengths.png")
CLOUDS = ("wordclouds.png", "wordcloud_corpus.png", *PROMPT_CLOUDS)


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *args], env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run) -> Path:
    """A copy of the shared trained run (4 steps, evaluated at 2 and 4), its shards beside it as
    where it trained."""
    root = tmp_path_factory.mktemp("report")
    for name in ("run", "shards"):
        shutil.copytree(trained_run / name, root / name)
    return root / "run"


@pytest.fixture(scope="module")
def report(trained) -> Path:
    from flax_gpt.report.report import write_report

    index = write_report(trained, samples=2, max_new_tokens=16, say=lambda _: None)
    assert index == trained / "report" / "index.html"
    return index


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), f"{path.name} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert path.stat().st_size > 10_000, f"{path.name} is only {path.stat().st_size} bytes"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    assert rgb.std() > 5.0, f"{path.name} is (nearly) one colour"
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert colours.size > 16, f"{path.name} has almost no colours"


def _coloured_fraction(path: Path) -> float:
    """Share of saturated pixels: data (lines, bars, cloud words), not the black/grey axes and text."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    return float(((rgb.max(-1) - rgb.min(-1)) > 60).mean())


@pytest.mark.parametrize("name", PLOTS + CLOUDS)
def test_every_image_is_a_real_nonblank_png_with_data_drawn(report, name):
    _check_png(report.parent / name)
    # An empty axes with a legend sample is ~0.05% coloured; a drawn series ~0.5%; a word cloud ~10%.
    least = 0.03 if name in CLOUDS else 0.002
    assert _coloured_fraction(report.parent / name) > least, f"{name} shows (almost) no data"


def test_combined_cloud_is_four_clouds_side_by_side(report):
    from PIL import Image

    with Image.open(report.parent / "wordclouds.png") as combined, \
            Image.open(report.parent / "wordcloud_corpus.png") as single:
        assert combined.width / combined.height > 2.5 * single.width / single.height


def test_index_shows_images_metrics_and_samples(report, trained):
    page = report.read_text(encoding="utf-8")
    for name in PLOTS + CLOUDS:
        assert f'src="{name}"' in page, f"index.html does not show {name}"

    lines = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    last_eval = [ln for ln in lines if "val_loss" in ln][-1]
    last_train = [ln for ln in lines if "loss" in ln][-1]
    assert f"<td>{last_eval['val_loss']:.4f}</td>" in page
    assert f"<td>{last_eval['perplexity']:,.0f}</td>" in page
    assert f"<td>{last_train['tokens_seen']:,}</td>" in page

    manifest = json.loads((trained.parent / "shards" / "manifest.json").read_text())
    waste = manifest["stats"]["pad_truncate_300"]["padding_fraction"]
    assert f"{100 * waste:.1f}%" in page
    assert "SYNTHETIC" in page

    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["val_loss"] == last_eval["val_loss"]
    from flax_gpt.report.report import DEFAULT_PROMPTS

    assert list(summary["samples"]) == list(DEFAULT_PROMPTS)
    for prompt, texts in summary["samples"].items():
        assert len(texts) == 2
        for text in texts:
            assert html.escape(text) in page, f"sample for {prompt!r} missing from index.html"


def test_edge_cases_no_eval_repeated_step_relative_shards_escaped_samples(trained, tmp_path, monkeypatch):
    """A run with one step, no eval, a repeated (resumed) step and shards recorded relative to the
    directory training ran in; samples with markup must be escaped."""
    from flax_gpt.report import report as report_mod
    from flax_gpt.report.report import write_report

    base = tmp_path / "project"
    run = base / "runs" / "edge"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("report", "tb"))
    shutil.copytree(trained.parent / "shards", run / "shards")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["run_dir"], cfg["data"]["shards_dir"] = "runs/edge", "runs/edge/shards"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    first = {"step": 1, "loss": 10.5, "lr": 0.0, "grad_norm": 1.0, "tokens_seen": 128}
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n" + json.dumps({**first, "loss": 9.25}) + "\n")
    class Fake:
        def generate(self, prompts, *, num_samples, **kw):
            return ["<script>x & y</script>"] * len(prompts) * num_samples

    monkeypatch.setattr(report_mod, "load_model", lambda **kw: Fake())
    monkeypatch.chdir(tmp_path)  # not `base`: the shards must be found through the run directory

    index = write_report(run, samples=1, say=lambda _: None)
    for name in PLOTS + CLOUDS:
        _check_png(index.parent / name)
    page = index.read_text(encoding="utf-8")
    assert "&lt;script&gt;x &amp; y&lt;/script&gt;" in page and "<script>" not in page
    summary = json.loads((index.parent / "summary.json").read_text())
    assert (summary["final_train_loss"], summary["val_loss"], summary["notes"]) == (9.25, None, [])


def test_missing_metrics_is_a_one_line_config_error(trained, tmp_path):
    from flax_gpt.config import ConfigError
    from flax_gpt.report.report import write_report

    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(trained / "config.yaml", run / "config.yaml")
    with pytest.raises(ConfigError, match="metrics.jsonl") as err:
        write_report(run)
    assert "\n" not in str(err.value)
    assert not (run / "report").exists()

    r = _cli("report", str(run))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {err.value}"]
