"""`flax-gpt report` on a real (tiny) training run: every image is a real, non-blank PNG, the page
shows them with the metrics and the escaped samples, and edge cases (no eval, repeated steps,
shards_dir relative to another directory, no metrics file) are handled. The figures are checked
through what they draw: one mean tokens/s everywhere, every evaluation a marker, one loss panel,
length marks apart from each other and from the legend's text; and the report says what it is doing."""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import re
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
def made(trained) -> tuple[Path, list[str]]:
    """(index.html, the progress lines the report said)."""
    from flax_gpt.report.report import write_report

    lines: list[str] = []
    index = write_report(trained, samples=2, max_new_tokens=16, say=lines.append, progress=False)
    assert index == trained / "report" / "index.html"
    return index, lines


@pytest.fixture(scope="module")
def report(made) -> Path:
    return made[0]


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [ln for ln in lines if "loss" in ln], [ln for ln in lines if "val_loss" in ln]


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


def test_edge_cases_no_eval_repeated_step_relative_shards_escaped_samples(trained, tmp_path, monkeypatch, capfd):
    """A run with one step, no eval, a repeated (resumed) step and shards recorded relative to the
    directory training ran in; samples with markup must be escaped. Progress, by default, is on
    stderr: the phases and a bar counting the samples; stdout stays empty."""
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

    capfd.readouterr()
    index = write_report(run, samples=1)
    out, err = capfd.readouterr()
    assert out == ""
    assert "report: samples" in err and "3/3" in err, err  # tqdm's count of the samples
    assert re.search(r"^report \[ *\d+\.\d s\]: word clouds \(4\)$", err, re.MULTILINE) and "]: done" in err, err
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


def test_one_mean_tokens_per_sec_in_summary_page_and_plot(report, trained):
    from flax_gpt.report.plots import throughput_figure
    from flax_gpt.report.report import fmt
    from flax_gpt.report.series import MEAN_TPS_DEFINITION, mean_tokens_per_sec, read_series
    from flax_gpt.train.run_dir import RunDir

    train, _ = _records(trained)
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    timed = [r for r in train if "step_time_s" in r]
    # Step 1 compiles and is not timed; step 2, the first timed one, still warms up and is left out,
    # as training's own summary leaves it out. What is left: its tokens over its time.
    assert timed[0]["step"] == 2 and len(timed) > 1
    expected = per_step * (len(timed) - 1) / math.fsum(r["step_time_s"] for r in timed[1:])
    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["mean_tokens_per_sec"] == pytest.approx(expected, rel=1e-9)
    assert mean_tokens_per_sec(read_series(RunDir(trained))[0]) == summary["mean_tokens_per_sec"]
    assert summary["mean_tokens_per_sec_definition"] == MEAN_TPS_DEFINITION

    page = report.read_text(encoding="utf-8")
    assert f"<th>mean tokens/s</th><td>{fmt(summary['mean_tokens_per_sec'])}</td>" in page
    assert html.escape(MEAN_TPS_DEFINITION) in page  # the page says which mean it is

    lines = throughput_figure(read_series(RunDir(trained))[0]).axes[0].get_lines()
    (mean_line,) = [ln for ln in lines if ln.get_gid() == "mean"]
    assert mean_line.get_ydata()[0] == summary["mean_tokens_per_sec"]
    assert f"mean {summary['mean_tokens_per_sec']:,.0f} tokens/s" in mean_line.get_label()


def test_mean_tokens_per_sec_is_tokens_over_time_without_the_warmup_step():
    from flax_gpt.report.series import mean_mfu, mean_tokens_per_sec

    def rec(step: int, seconds: float | None = None) -> dict:  # 100 tokens per step
        timed = {"step_time_s": seconds, "tokens_per_sec": 100 / seconds, "mfu": 1e-3 / seconds} if seconds else {}
        return {"step": step, "loss": 1.0, **timed}

    # step 1 untimed, step 2 warming up (5 s), then 100 tokens in 1 s and 100 in 3 s: 50 tokens/s,
    # where the mean of the two rates would be 66.7 and with the warm-up step 28.6
    train = [rec(1), rec(2, 5.0), rec(3, 1.0), rec(4, 3.0)]
    assert mean_tokens_per_sec(train) == pytest.approx(200 / 4.0, rel=1e-12)
    assert mean_mfu(train) == pytest.approx(50 * 1e-5, rel=1e-12)  # MFU at that throughput
    # logged every 10 steps: the first logged step is an ordinary one and counts
    assert mean_tokens_per_sec([rec(10, 1.0), rec(20, 3.0)]) == pytest.approx(200 / 4.0, rel=1e-12)
    assert mean_tokens_per_sec([rec(1, 2.0)]) == pytest.approx(50.0)  # a lone timed step is all there is
    assert mean_tokens_per_sec([rec(1)]) is None


def test_perplexity_plot_marks_every_evaluation(trained, tmp_path):
    from flax_gpt.report.plots import perplexity_figure
    from flax_gpt.report.series import read_series
    from flax_gpt.train.run_dir import RunDir

    # A resumed run evaluated 7 times, step 30 written twice (the later line wins), next to the shared run.
    run = tmp_path / "resumed"
    run.mkdir()
    evals = {s: {"step": s, "val_loss": 9 - s / 100, "perplexity": math.exp(9 - s / 100)} for s in range(10, 80, 10)}
    evals[30] = {"step": 30, "val_loss": 8.5, "perplexity": math.exp(8.5)}
    lines = [{"step": s, "loss": 5.0} for s in range(1, 71)] + [{**evals[30], "val_loss": 9.0}] + list(evals.values())
    (run / "metrics.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))

    for source in (trained, run):
        train, _ = _records(source)
        written = {}
        for e in _records(source)[1]:
            written[e["step"]] = e
        expected = [written[s] for s in sorted(written)]
        fig = perplexity_figure(read_series(RunDir(source))[1], train[-1]["step"])
        ax = fig.axes[0]
        (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "evaluations"]
        assert list(line.get_xdata()) == [e["step"] for e in expected]
        assert list(line.get_ydata()) == [e["perplexity"] for e in expected]
        assert line.get_marker() == "o"  # each evaluation is a visible point
        assert [t.get_text() for t in ax.texts] == [f"{e['perplexity']:,.0f}" for e in expected]
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] >= train[-1]["step"]  # the whole run's steps
        assert f"each of the {len(expected)} evaluations" in ax.get_title()


def test_loss_is_drawn_once_with_tokens_seen_on_the_top_axis(trained):
    from flax_gpt.report.plots import loss_figure
    from flax_gpt.report.series import read_series
    from flax_gpt.train.run_dir import RunDir

    train, evals = read_series(RunDir(trained))
    fig = loss_figure(train, evals)
    fig.canvas.draw()
    assert len(fig.axes) == 1  # one loss panel: a by-tokens panel repeats the same curve
    (ax,) = fig.axes
    assert [ln.get_label() for ln in ax.get_lines()] == ["train loss", "validation loss"]
    (top,) = ax.child_axes
    assert top.get_xlabel() == "training tokens seen"
    per_step = train[-1]["tokens_seen"] / train[-1]["step"]
    assert top.get_xlim() == pytest.approx(tuple(per_step * x for x in ax.get_xlim()), rel=1e-12)


def test_length_marks_stand_apart_and_the_legend_clears_the_plot(trained):
    from flax_gpt.report.plots import corpus_figure

    stats = json.loads((trained.parent / "shards" / "manifest.json").read_text())
    # the hardest case: mode, mean and median on the same value
    stats["stats"]["words"].update(mode=150.0, mean=150.0, median=150.0)
    fig = corpus_figure(stats)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = []
    for ax, key in zip(fig.axes, ("words", "tokens")):
        marks = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid() in ("mode", "mean", "median")}
        assert list(marks) == ["mode", "mean", "median"]
        for name, ln in marks.items():
            assert ln.get_xdata()[0] == stats["stats"][key][name]
        # each line ends in its own marker at its own height, apart by more than a marker's size
        tops = sorted(ax.transData.transform((ln.get_xdata()[1], ln.get_ydata()[1]))[1] for ln in marks.values())
        size_px = max(ln.get_markersize() for ln in marks.values()) * fig.dpi / 72
        assert min(b - a for a, b in itertools.pairwise(tops)) > size_px
        assert all(ln.get_marker() not in ("None", "", None) for ln in marks.values())
        legend = ax.get_legend()
        texts = [t.get_text() for t in legend.get_texts()]
        assert [t.split()[0] for t in texts[1:4]] == ["mode", "mean", "median"]
        box = legend.get_window_extent(renderer)
        # outside the axes (no bar or line runs through its text), clear of the tick labels and axis label
        assert not box.overlaps(ax.get_window_extent(renderer))
        assert not any(box.overlaps(t.get_window_extent(renderer)) for t in (ax.xaxis.label, *ax.get_xticklabels()))
        legends.append(box)
    assert not legends[0].overlaps(legends[1])


def test_report_says_each_phase_with_the_time_since_it_began(made):
    _, lines = made
    assert all(re.fullmatch(r"report \[ *\d+\.\d s\]: .+", ln) for ln in lines), lines
    phases = ("4 training and 2 evaluation records", "sampling 2 continuation(s) of 16 tokens for each of 3",
              "plots:", "corpus:", "word clouds (4)", "summary.json", "done")
    where = [next((i for i, ln in enumerate(lines) if p in ln), None) for p in phases]
    assert None not in where and where == sorted(where), lines
    elapsed = [float(re.search(r"\[ *([\d.]+) s\]", ln).group(1)) for ln in lines]
    assert elapsed == sorted(elapsed)
