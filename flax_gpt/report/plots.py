"""Figures of the report: matplotlib `Figure` objects on an Agg canvas (never pyplot, so no display
is needed and the caller's backend is left alone) and word clouds with a fixed `random_state`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator, NullFormatter
from wordcloud import STOPWORDS, WordCloud

DPI = 120
MARKERS_UP_TO = 40  # draw point markers on series this short, so one or two points stay visible
# LaTeX and HTML leftovers that would otherwise top an arXiv word cloud.
MARKUP_WORDS = {
    "mathbf", "mathcal", "mathrm", "mathbb", "frac", "cite", "citep", "citet", "ref", "eqref", "textit",
    "textbf", "emph", "begin", "end", "left", "right", "ldots", "cdots", "cdot", "leq", "geq", "le", "ge",
    "sim", "alpha", "mathit", "url", "http", "https", "www", "com", "org", "amp", "nbsp", "lt", "gt", "quot",
    "br", "div", "span", "href", "endoftext", "et", "al", "i.e", "e.g", "eg", "ie",
}


def column(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry `key`; non-finite values become NaN (plot gaps)."""
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    steps = np.array([s for s, _ in rows], dtype=np.int64)
    values = np.array([v for _, v in rows], dtype=np.float64)
    return steps, np.where(np.isfinite(values), values, np.nan)


def new_figure(ncols: int = 1, *, width: float = 7.0, height: float = 4.5):
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
