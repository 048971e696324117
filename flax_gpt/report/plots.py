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

from flax_gpt.report.series import column, mean_mfu, mean_tokens_per_sec, warmup_step
from flax_gpt.train.metric_keys import LOSS, LR, MFU, PERPLEXITY, STEP, TOKENS_PER_SEC, TOKENS_SEEN, VAL_LOSS

DPI = 120
MARKERS_UP_TO = 40  # draw point markers on series this short, so one or two points stay visible
ANNOTATE_UP_TO = 12  # label evaluations with their value up to this many; more would crowd the plot
# LaTeX and HTML leftovers that would otherwise top an arXiv word cloud.
MARKUP_WORDS = {
    "mathbf", "mathcal", "mathrm", "mathbb", "frac", "cite", "citep", "citet", "ref", "eqref", "textit",
    "textbf", "emph", "begin", "end", "left", "right", "ldots", "cdots", "cdot", "leq", "geq", "le", "ge",
    "sim", "alpha", "mathit", "url", "http", "https", "www", "com", "org", "amp", "nbsp", "lt", "gt", "quot",
    "br", "div", "span", "href", "endoftext", "et", "al", "i.e", "e.g", "eg", "ie",
}


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


def loss_figure(train: list[dict], evals: list[dict]) -> Figure:
    """Train and validation loss against the step, with the tokens seen on a second x-axis on top
    (one panel: tokens seen is the step times a fixed batch, so a by-tokens panel repeats the curve)."""
    steps, loss = column(train, LOSS)
    vsteps, vloss = column(evals, VAL_LOSS)
    fig, (ax,) = new_figure(width=8.0)
    long = len(loss) > 50
    plot_line(ax, steps, loss, "train loss (raw)" if long else "train loss", color="tab:blue",
              alpha=0.35 if long else 1.0)
    if long:  # the raw curve of a long run is noise around this trend
        ax.plot(steps, ema(loss, 0.9), color="tab:blue", label="train loss (EMA 0.9)")
    if len(vsteps):
        ax.plot(vsteps, vloss, color="tab:orange", marker="o", markersize=5, label="validation loss")
    style(ax, "Loss vs step", "step", "cross-entropy (nats/token)")
    per_step = tokens_per_step(train)
    if per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.xaxis.set_major_formatter(EngFormatter())
        top.set_xlabel("training tokens seen")
    return fig


def tokens_per_step(train: list[dict]) -> float | None:
    """Tokens per step when `tokens_seen` is the step times one constant (it is, unless a run was
    resumed with another batch): then tokens seen can label the step axis. None otherwise."""
    steps, seen = column(train, TOKENS_SEEN)
    if not len(steps) or steps.min() <= 0:
        return None
    per = seen / steps
    return float(per[0]) if np.allclose(per, per[0], rtol=1e-9) else None


def perplexity_figure(evals: list[dict], last_step: int | None = None) -> Figure:
    """Every evaluation of metrics.jsonl as a marker, joined in step order, over the whole run's steps
    (`last_step`), so a run evaluated twice shows where the two fell; up to ANNOTATE_UP_TO points
    carry their value, so a short series reads as exactly as a table."""
    steps, ppl = column(evals, PERPLEXITY)
    fig, (ax,) = new_figure()
    if len(steps):
        ax.plot(steps, ppl, color="tab:orange", marker="o", markersize=6, label="validation perplexity",
                gid="evaluations")
        ax.set_yscale("log")
        if len(steps) <= ANNOTATE_UP_TO:
            for x, y in zip(steps, ppl):
                if np.isfinite(y):
                    ax.annotate(f"{y:,.0f}" if y >= 100 else f"{y:.2f}", (x, y), xytext=(0, 9),
                                textcoords="offset points", ha="center", fontsize=9, color="0.25",
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
            ax.margins(y=0.15)  # room for the labels above the top point
        plain_log_labels(ax)
        if last_step:
            ax.set_xlim(0, max(last_step, int(steps.max())) * 1.06)
    n = len(steps)
    style(ax, f"Validation perplexity at each of the {n} evaluation{'s' * (n != 1)}" if n else
          "Validation perplexity vs step", "step", "perplexity (log scale)",
          empty=None if n else "no evaluation recorded\n(set train.eval_every, or let training finish)")
    return fig


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


def lr_figure(train: list[dict]) -> Figure:
    steps, lr = column(train, LR)
    fig, (ax,) = new_figure()
    plot_line(ax, steps, lr, "learning rate", color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    style(ax, "Learning rate vs step", "step", "learning rate", empty=None if len(steps) else "no lr recorded")
    return fig


def throughput_figure(train: list[dict]) -> Figure:
    """tokens/s per logged step, the warm-up step apart, and the one mean (series.mean_tokens_per_sec)."""
    skip = warmup_step(train)
    steps, tps = column([r for r in train if r[STEP] != skip], TOKENS_PER_SEC)
    wsteps, wtps = column([r for r in train if r[STEP] == skip], TOKENS_PER_SEC)
    msteps, mfu = column([r for r in train if r[STEP] != skip], MFU)
    fig, axes = new_figure(2 if len(msteps) else 1)
    plot_line(axes[0], steps, tps, "tokens/s (all devices)", color="tab:purple", markersize=6)
    if len(wsteps):  # shown, but hollow: it is not in the mean
        axes[0].plot(wsteps, wtps, linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                     color="0.45", label=f"step {int(wsteps[0])}: warm-up, not in the mean")
    mean = mean_tokens_per_sec(train)
    if mean is not None:
        axes[0].axhline(mean, color="indigo", linestyle="--", linewidth=1.5, gid="mean",
                        label=f"mean {mean:,.0f} tokens/s (tokens ÷ time)")
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if len(steps) or len(wsteps):  # from zero, so step-to-step noise is not drawn as a collapse; headroom
        # keeps the fastest point off the frame
        axes[0].set_ylim(0, 1.15 * np.nanmax(np.concatenate([tps, wtps, [mean or 0]])))
    style(axes[0], "Training throughput vs step", "step", "tokens / second",
          empty=None if len(steps) or len(wsteps) else
          "no throughput recorded\n(the first step compiles and is not timed)")
    if len(msteps):
        plot_line(axes[1], msteps, 100 * mfu, "MFU", color="tab:red")
        if (m := mean_mfu(train)) is not None:
            axes[1].axhline(100 * m, color="0.3", linestyle="--", linewidth=1,
                            label=f"at the mean tokens/s {100 * m:.1f}%")
        axes[1].set_ylim(bottom=0)
        style(axes[1], "Model FLOPs utilisation vs step", "step", "MFU (% of peak)")
    return fig


# Mode, mean and median often lie within a few percent of each other: each line ends in its own
# marker at its own height, so lines that nearly coincide stay apart, and the legend with the values
# sits under the axes, where no bar or line can run through its text.
LENGTH_MARKS = (("mode", ":", "black", "v", 1.26), ("mean", "-", "tab:red", "D", 1.16),
                ("median", "--", "tab:orange", "o", 1.06))


def corpus_figure(manifest: dict) -> Figure:
    stats, src = manifest["stats"], manifest["source"]
    fig, axes = new_figure(2, width=6.5, height=5.2)
    for ax, key, color in ((axes[0], "words", "tab:blue"), (axes[1], "tokens", "tab:green")):
        s = stats[key]
        edges, counts = s["histogram"]["bin_edges"], s["histogram"]["counts"]
        top = max(max(counts), 1)
        ax.stairs(counts, edges, fill=True, color=color, alpha=0.45, label="documents")
        for name, ls, c, marker, height in LENGTH_MARKS:
            v = s[name]
            ax.plot([v, v], [0, height * top], linestyle=ls, color=c, linewidth=1.8, marker=marker,
                    markevery=[1], markersize=8, gid=name, label=f"{name} {v:,.{0 if v == int(v) else 1}f}")
        pad = stats.get("pad_truncate_300", {}).get("length")
        if key == "tokens" and pad and edges[0] <= pad * 1.25 and pad <= edges[-1] * 1.25:
            ax.axvline(pad, color="0.5", linewidth=1.2, label=f"pad/truncate length {pad}")
        ax.set_ylim(0, 1.34 * top)
        unit = "tokens (EOS not counted)" if key == "tokens" else "words"
        style(ax, f"Document length in {key}", f"document length in {unit}", "documents")
        entries = len(ax.get_legend_handles_labels()[0])  # one row when it fits, else filled column by column
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=entries if entries <= 4 else 3,
                  frameon=False, fontsize=9)
    kind = "SYNTHETIC corpus (generated, not real text)" if src.get("synthetic") else "Corpus"
    desc = src.get("description", "")
    desc = desc if len(desc) <= 110 else desc[:107] + "..."
    fig.suptitle(f"{kind}: {stats.get('documents', 0):,} documents\n{desc}", fontweight="bold")
    return fig


# The report writes each figure to RUN_DIR/report/NAME.png; these keep that one call per file.
def plot_loss(out: Path, train: list[dict], evals: list[dict]) -> str:
    return save(loss_figure(train, evals), out / "loss.png")


def plot_perplexity(out: Path, evals: list[dict], last_step: int | None = None) -> str:
    return save(perplexity_figure(evals, last_step), out / "perplexity.png")


def plot_lr(out: Path, train: list[dict]) -> str:
    return save(lr_figure(train), out / "learning_rate.png")


def plot_throughput(out: Path, train: list[dict]) -> str:
    return save(throughput_figure(train), out / "throughput.png")


def plot_corpus(out: Path, manifest: dict) -> str:
    return save(corpus_figure(manifest), out / "corpus_lengths.png")


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
