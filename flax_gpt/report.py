"""`flax-gpt report`: plots, word clouds and an `index.html` for a run directory, in RUN_DIR/report/.

Reads only contracts: `metrics.jsonl` (`metrics.read_metrics`; a resumed run may repeat a step and
the later line wins), `config.yaml` (`run.read_run_config`), the shards' `manifest.json` (its
`stats` block) and training split, and the run's latest checkpoint (`generate.sample_run`).

Figures are drawn on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so making
a report neither needs a display nor switches the backend of the caller (a notebook, say). Word
clouds use a fixed `random_state`: the same run gives the same images.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from flax_gpt.config import ConfigError

DEFAULT_PROMPTS = ("the role of recommender systems", "clustering", "transformers for text generation")
REPORT_DIR = "report"
DPI = 120
CORPUS_TOKEN_CAP = 300_000  # enough text for a stable word cloud; decoding more only costs time
MARKERS_UP_TO = 40  # draw point markers on series this short, so one or two points stay visible
# LaTeX and HTML leftovers that would otherwise top an arXiv word cloud.
MARKUP_WORDS = {
    "mathbf", "mathcal", "mathrm", "mathbb", "frac", "cite", "citep", "citet", "ref", "eqref", "textit",
    "textbf", "emph", "begin", "end", "left", "right", "ldots", "cdots", "cdot", "leq", "geq", "le", "ge",
    "sim", "alpha", "mathit", "url", "http", "https", "www", "com", "org", "amp", "nbsp", "lt", "gt", "quot",
    "br", "div", "span", "href", "endoftext", "et", "al", "i.e", "e.g", "eg", "ie",
}


# ----------------------------------------------------------------------------- inputs


def read_series(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), one per step (the later line wins), sorted by step."""
    from flax_gpt.metrics import METRICS_FILE, read_metrics

    if not (run_dir / METRICS_FILE).is_file():
        raise ConfigError(f"{run_dir} has no {METRICS_FILE}; pass the train.run_dir of a run that has trained "
                          f"(`flax-gpt train CONFIG train.run_dir={run_dir}`)")
    try:
        records = read_metrics(run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train = {int(r["step"]): r for r in records if "loss" in r}
    evals = {int(r["step"]): r for r in records if "val_loss" in r}
    if not train:
        raise ConfigError(f"{run_dir / METRICS_FILE} has no training records; train at least one step first")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def column(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry `key`; non-finite values become NaN (plot gaps)."""
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    steps = np.array([s for s, _ in rows], dtype=np.int64)
    values = np.array([v for _, v in rows], dtype=np.float64)
    return steps, np.where(np.isfinite(values), values, np.nan)


def find_shards(run_dir: Path, cfg) -> Path | None:
    """The run's shards folder. A relative `data.shards_dir` is relative to where training was run;
    when that is not here, recover it from the run directory (whose train.run_dir shares that base)."""
    from flax_gpt.data.shards import MANIFEST_NAME

    shards = Path(cfg.data.shards_dir)
    candidates = [shards]
    rel = Path(cfg.train.run_dir)
    parts = run_dir.resolve().parts
    if not shards.is_absolute() and not rel.is_absolute() and parts[-len(rel.parts):] == rel.parts:
        candidates.append(Path(*parts[: len(parts) - len(rel.parts)]) / shards)
    return next((c for c in candidates if (c / MANIFEST_NAME).is_file()), None)


def corpus_text(shards_dir: Path, manifest: dict, cap: int = CORPUS_TOKEN_CAP) -> str:
    """Decoded text of (up to `cap` tokens of) the training split, documents split at EOS."""
    from flax_gpt.data import load_tokenizer, open_split

    rows = open_split(shards_dir, "train")
    n = min(rows.num_rows, max(1, cap // rows.seq_len))
    # Contiguous rows keep documents whole; spread over the split in 8 blocks for a fair sample.
    blocks = np.array_split(np.arange(rows.num_rows), 8)
    idx = np.concatenate([b[: -(-n // 8)] for b in blocks if b.size])[:n]
    flat = rows.rows(idx).reshape(-1)
    tok = load_tokenizer(manifest["tokenizer"]["name"])
    docs = np.split(flat, np.flatnonzero(flat == rows.eos_id))
    return "\n".join(tok.decode(d[d != rows.eos_id]) for d in docs if d.size > 1)


# ----------------------------------------------------------------------------- figures


def new_figure(ncols: int = 1, *, width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path.name


def plot_line(ax, x, y, label: str, **kw) -> None:
    """A line, with markers when the series is short (a single point is then still visible)."""
    if len(x) <= MARKERS_UP_TO:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 4)
    ax.plot(x, y, label=label, **kw)


def style(ax, title: str, xlabel: str, ylabel: str, *, empty: str | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if empty:  # no data: a message instead of meaningless ticks
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
        return
    if xlabel == "step":  # no tick at step 2.5; a single step gets a window of +-1 around it
        lo, hi = ax.get_xlim()
        if hi - lo < 2:
            ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def ema(y: np.ndarray, alpha: float) -> np.ndarray:
    out, acc = np.empty_like(y), np.nan
    for i, v in enumerate(y):
        acc = v if np.isnan(acc) else (acc if np.isnan(v) else alpha * acc + (1 - alpha) * v)
        out[i] = acc
    return out


def plot_loss(out: Path, train: list[dict], evals: list[dict]) -> str:
    from matplotlib.ticker import EngFormatter

    steps, loss = column(train, "loss")
    vsteps, vloss = column(evals, "val_loss")
    tsteps, seen = column(train, "tokens_seen")
    fig, (by_step, by_tokens) = new_figure(2)
    panels = [(by_step, steps, vsteps)]
    if len(tsteps):  # eval steps get the tokens seen by the train step of the same number
        panels.append((by_tokens, np.interp(steps, tsteps, seen), np.interp(vsteps, tsteps, seen)))
    for ax, x, vx in panels:
        long = len(loss) > 50
        plot_line(ax, x, loss, "train loss (raw)" if long else "train loss", color="tab:blue",
                  alpha=0.35 if long else 1.0)
        if long:  # the raw curve of a long run is noise around this trend
            ax.plot(x, ema(loss, 0.9), color="tab:blue", label="train loss (EMA 0.9)")
        if len(vsteps):
            ax.plot(vx, vloss, color="tab:orange", marker="o", markersize=5, label="validation loss")
    style(by_step, "Loss vs step", "step", "cross-entropy (nats/token)")
    if len(tsteps):
        by_tokens.xaxis.set_major_formatter(EngFormatter())
        style(by_tokens, "Loss vs tokens seen", "training tokens seen", "cross-entropy (nats/token)")
    else:
        style(by_tokens, "Loss vs tokens seen", "training tokens seen", "", empty="no tokens_seen in metrics")
    return save(fig, out / "loss.png")


def plot_perplexity(out: Path, evals: list[dict]) -> str:
    steps, ppl = column(evals, "perplexity")
    fig, (ax,) = new_figure()
    if len(steps):
        ax.plot(steps, ppl, color="tab:orange", marker="o", markersize=5, label="validation perplexity")
        ax.set_yscale("log")
        plain_log_labels(ax)
    style(ax, "Validation perplexity vs step", "step", "perplexity (log scale)",
          empty=None if len(steps) else "no evaluation recorded\n(set train.eval_every, or let training finish)")
    return save(fig, out / "perplexity.png")


def plain_log_labels(ax) -> None:
    """Log-axis labels as plain numbers; within one decade the minor ticks are labelled too
    (matplotlib would write 5.02x10^4 there)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    narrow = hi / lo < 10
    ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
    if narrow:  # the only gridlines inside one decade are minor ones
        ax.grid(True, which="minor", alpha=0.3)


def plot_lr(out: Path, train: list[dict]) -> str:
    steps, lr = column(train, "lr")
    fig, (ax,) = new_figure()
    plot_line(ax, steps, lr, "learning rate", color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    style(ax, "Learning rate vs step", "step", "learning rate", empty=None if len(steps) else "no lr recorded")
    return save(fig, out / "learning_rate.png")


def plot_throughput(out: Path, train: list[dict]) -> str:
    from matplotlib.ticker import FuncFormatter

    steps, tps = column(train, "tokens_per_sec")
    msteps, mfu = column(train, "mfu")
    fig, axes = new_figure(2 if len(msteps) else 1)
    plot_line(axes[0], steps, tps, "tokens/s (all devices)", color="tab:purple")
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if len(steps) > 1:
        axes[0].axhline(np.nanmean(tps), color="0.4", linestyle="--", linewidth=1,
                        label=f"mean {np.nanmean(tps):,.0f} tokens/s")
    style(axes[0], "Training throughput vs step", "step", "tokens / second",
          empty=None if len(steps) else "no throughput recorded\n(the first step compiles and is not timed)")
    if len(msteps):
        plot_line(axes[1], msteps, 100 * mfu, "MFU", color="tab:red")
        style(axes[1], "Model FLOPs utilisation vs step", "step", "MFU (% of peak)")
    return save(fig, out / "throughput.png")


def plot_corpus(out: Path, manifest: dict) -> str:
    stats, src = manifest["stats"], manifest["source"]
    fig, axes = new_figure(2, width=6.5)
    for ax, key, color in ((axes[0], "words", "tab:blue"), (axes[1], "tokens", "tab:green")):
        s = stats[key]
        edges, counts = s["histogram"]["bin_edges"], s["histogram"]["counts"]
        ax.stairs(counts, edges, fill=True, color=color, alpha=0.45, label="documents")
        for name, ls, c in (("mode", ":", "black"), ("mean", "-", "tab:red"), ("median", "--", "tab:orange")):
            v = s[name]
            ax.axvline(v, linestyle=ls, color=c, linewidth=1.8, label=f"{name} {v:,.{0 if v == int(v) else 1}f}")
        pad = stats.get("pad_truncate_300", {}).get("length")
        if key == "tokens" and pad and edges[0] <= pad * 1.25 and pad <= edges[-1] * 1.25:
            ax.axvline(pad, color="0.5", linewidth=1.2, label=f"pad/truncate length {pad}")
        ax.set_ylim(0, 1.6 * max(max(counts), 1))  # headroom: the legend sits above the bars
        unit = "tokens (EOS not counted)" if key == "tokens" else "words"
        style(ax, f"Document length in {key}", f"document length in {unit}", "documents")
    kind = "SYNTHETIC corpus (generated, not real text)" if src.get("synthetic") else "Corpus"
    desc = src.get("description", "")
    desc = desc if len(desc) <= 110 else desc[:107] + "..."
    fig.suptitle(f"{kind}: {stats.get('documents', 0):,} documents\n{desc}", fontweight="bold")
    return save(fig, out / "corpus_lengths.png")


# ----------------------------------------------------------------------------- word clouds


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "prompt"


def cloud_image(text: str, seed: int = 0) -> np.ndarray | None:
    """RGB array of a word cloud of `text` without stopwords/markup; None when no word is left."""
    from wordcloud import STOPWORDS, WordCloud

    wc = WordCloud(width=900, height=540, background_color="white", colormap="Dark2", max_words=150,
                   stopwords=STOPWORDS | MARKUP_WORDS, collocations=False, random_state=seed, margin=4)
    freqs = wc.process_text(text)
    return wc.generate_from_frequencies(freqs).to_array() if freqs else None


def draw_cloud(ax, image: np.ndarray | None, title: str) -> None:
    ax.set_title(title, fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():  # a light frame keeps side-by-side clouds apart
        spine.set_color("0.8")
    if image is None:
        ax.text(0.5, 0.5, "no words left after\nstopword removal", ha="center", va="center", color="0.4",
                transform=ax.transAxes)
    else:
        ax.imshow(image, interpolation="bilinear")


def plot_clouds(out: Path, clouds: list[tuple[str, str, np.ndarray | None]]) -> tuple[str, list[str]]:
    """One figure with every cloud side by side, and one PNG per cloud: (combined, [singles])."""
    singles = []
    for name, title, image in clouds:
        fig, (ax,) = new_figure(width=7.5, height=5.0)
        draw_cloud(ax, image, title)
        singles.append(save(fig, out / f"wordcloud_{name}.png"))
    fig, axes = new_figure(len(clouds), width=5.5, height=3.7)
    for ax, (_, title, image) in zip(axes, clouds):
        draw_cloud(ax, image, title)
    return save(fig, out / "wordclouds.png"), singles


# ----------------------------------------------------------------------------- summary + html


def summarize(train: list[dict], evals: list[dict], run_dir: Path) -> dict:
    steps, tps = column(train, "tokens_per_sec")
    _, times = column(train, "step_time_s")
    _, mfu = column(train, "mfu")
    if len(tps) and len(times) == len(tps) and np.nansum(times) > 0:  # total tokens / total time
        mean_tps = float(np.nansum(tps * times) / np.nansum(times))
    else:
        mean_tps = float(np.nanmean(tps)) if len(tps) else None
    last_eval = evals[-1] if evals else {}
    ckpt = run_dir / "checkpoints"
    return {
        "steps": int(train[-1]["step"]),
        "tokens_seen": train[-1].get("tokens_seen"),
        "final_train_loss": train[-1].get("loss"),
        "last_eval_step": last_eval.get("step"),
        "val_loss": last_eval.get("val_loss"),
        "perplexity": last_eval.get("perplexity"),
        "best_val_loss": min((e["val_loss"] for e in evals), default=None),
        "mean_tokens_per_sec": mean_tps,
        "mean_mfu": float(np.nanmean(mfu)) if len(mfu) else None,
        "checkpoints": sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else [],
    }


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def figure_html(name: str, caption: str) -> str:
    return (f'<figure><a href="{name}"><img src="{name}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
th{background:#f4f4f4;font-weight:600}pre{white-space:pre-wrap;background:#f8f8f8;padding:.7em;
border-left:3px solid #99c}.note{color:#a40}b.prompt{color:#236}"""


def write_html(out: Path, run_dir: Path, cfg, summary: dict, figures: list[tuple[str, str]],
               manifest: dict | None, samples: dict[str, list[str]], notes: list[str]) -> Path:
    m = cfg.model
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>flax_gpt report: "
             f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Training report: {html.escape(str(run_dir))}</h1>",
             f"<p>GPT-2 <code>{html.escape(m.preset)}</code>: {m.n_layer} layers, width {m.n_embd}, "
             f"{m.n_head} heads, context {m.n_positions}; batch {cfg.train.batch_size} × {cfg.data.seq_len} "
             f"tokens, learning rate {cfg.optim.learning_rate:g}.</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Final metrics</h2>" + table([
        ("steps", summary["steps"]), ("tokens seen", summary["tokens_seen"]),
        ("final train loss", summary["final_train_loss"]),
        (f"validation loss (step {fmt(summary['last_eval_step'])})", summary["val_loss"]),
        ("validation perplexity", summary["perplexity"]), ("best validation loss", summary["best_val_loss"]),
        ("mean tokens/s", summary["mean_tokens_per_sec"]),
        *([("mean MFU", f"{100 * summary['mean_mfu']:.1f}%")] if summary["mean_mfu"] is not None else []),
        ("checkpoints", ", ".join(map(str, summary["checkpoints"])) or None)]))
    if manifest is not None:
        s, src, p = manifest["stats"], manifest["source"], manifest["stats"].get("pad_truncate_300", {})
        dropped = sum(sp["dropped_tokens"] for sp in manifest["splits"].values())
        packed = sum(sp["tokens"] for sp in manifest["splits"].values())
        rows = [("source", src["description"] + ("  [SYNTHETIC]" if src.get("synthetic") else "")),
                ("documents", s.get("documents"))]
        for key in ("words", "tokens"):
            d = s[key]
            rows.append((f"length in {key}: mean / median / mode / min / max",
                         " / ".join(f"{d[k]:,.{0 if d[k] == int(d[k]) else 1}f}"
                                    for k in ("mean", "median", "mode", "min", "max"))))
        rows += [(f"{name} split", f"{sp['rows']:,} rows × {manifest['seq_len']} = {sp['tokens']:,} tokens, "
                                   f"{sp['documents']:,} documents") for name, sp in manifest["splits"].items()]
        if p:
            rows += [(f"pad/truncate to {p['length']}: padding slots", f"{100 * p['padding_fraction']:.1f}%"),
                     (f"pad/truncate to {p['length']}: documents truncated",
                      f"{100 * p['truncated_documents_fraction']:.1f}%"),
                     (f"pad/truncate to {p['length']}: tokens cut off", f"{100 * p['truncated_tokens_fraction']:.1f}%")]
        rows.append((f"{manifest['packing']} (what training used): tokens dropped",
                     f"{100 * dropped / max(1, packed + dropped):.2f}%"))
        parts.append("<h2>Corpus</h2>" + table(rows))
    parts.append("<h2>Figures</h2>" + "".join(figure_html(n, c) for n, c in figures))
    if samples:
        parts.append("<h2>Generated samples</h2><p>Nucleus sampling (top-p 0.95) from the latest checkpoint; "
                     "the prompt is in bold.</p>")
        for prompt, texts in samples.items():
            parts.append(f"<h3>{html.escape(prompt)}</h3>")
            parts += [f"<pre><b class='prompt'>{html.escape(prompt)}</b>{html.escape(t)}</pre>" for t in texts]
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the verb


def write_report(run_dir: str | Path, *, samples: int = 10, max_new_tokens: int = 64,
                 prompts: Sequence[str] = DEFAULT_PROMPTS, say=print) -> Path:
    """Write RUN_DIR/report/{*.png, index.html, summary.json}; return the index.html path.

    `samples` continuations of `max_new_tokens` per prompt (0: none). Parts whose inputs are missing
    (no shards here, no checkpoint yet) are left out with a note; a missing metrics.jsonl is an error.
    """
    from flax_gpt.run import read_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; pass the train.run_dir of a trained run")
    train, evals = read_series(run_dir)
    cfg = read_run_config(run_dir)
    notes: list[str] = []
    # Sample first: a bad --max-new-tokens fails here, before any file is written.
    texts: dict[str, list[str]] = {}
    if samples > 0 and prompts:
        from flax_gpt.checkpoint import CheckpointError
        from flax_gpt.generate import sample_run

        try:
            flat = sample_run(run_dir, list(prompts), max_new_tokens=max_new_tokens, seed=cfg.train.seed,
                              num_samples=samples)
        except CheckpointError as e:
            notes.append(f"Samples left out: {e}")
        else:  # prompt-major order; each text is prompt + continuation, the clouds show the continuation
            texts = {p: [t[len(p):] if t.startswith(p) else t for t in flat[i * samples:(i + 1) * samples]]
                     for i, p in enumerate(prompts)}
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    figures = [
        (plot_loss(out, train, evals), "Training loss (per step) and validation loss (markers) against "
                                       "optimizer steps (left) and training tokens seen (right)."),
        (plot_perplexity(out, evals), "Validation perplexity, exp(validation loss), on a log scale."),
        (plot_lr(out, train), "Learning rate applied at each step (the optimizer's schedule)."),
        (plot_throughput(out, train), "Training throughput in tokens per second over all devices "
                                      "(and MFU where the device's peak is known); step 1 compiles and is not timed."),
    ]

    clouds, manifest = [], None
    shards = find_shards(run_dir, cfg)
    if shards is None:
        notes.append(f"Corpus plots left out: no manifest.json at data.shards_dir={cfg.data.shards_dir} "
                     f"(relative to where training ran); run the report from that directory.")
    else:
        from flax_gpt.data import read_manifest

        manifest = read_manifest(shards)
        synthetic = " (synthetic)" if manifest["source"].get("synthetic") else ""
        figures.append((plot_corpus(out, manifest), f"Document lengths of the whole corpus{synthetic}, in words "
                        "and in tokens, with mode, mean and median; the grey line is the pad/truncate length."))
        clouds.append(("corpus", f"training corpus{synthetic}", cloud_image(corpus_text(shards, manifest))))

    clouds += [(slug(p), f"samples: “{p}”", cloud_image("\n".join(ts))) for p, ts in texts.items()]
    if clouds:
        combined, singles = plot_clouds(out, clouds)
        figures.append((combined, "Word clouds (English stopwords and LaTeX/markup removed) of the training "
                        "corpus and of the generated continuations of each prompt, side by side."))
        figures += [(n, f"The same word cloud on its own: {t}.") for n, (_, t, _) in zip(singles, clouds)]

    summary = summarize(train, evals, run_dir)
    (out / "summary.json").write_text(json.dumps({**summary, "samples": texts, "notes": notes}, indent=1) + "\n")
    for n in notes:
        say(f"note: {n}")
    return write_html(out, run_dir, cfg, summary, figures, manifest, texts, notes)
