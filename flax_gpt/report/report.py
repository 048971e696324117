"""`flax-gpt report`: plots, word clouds and an `index.html` for a run directory, in RUN_DIR/report/.

Reads only contracts, through `RunDir`: `metrics.jsonl` (`series.read_series`; a resumed run may
repeat a step and the later line wins), `config.yaml`, the shards' `manifest.json` (its `stats`
block) and training split, and the run's latest checkpoint (`generate.load_model`).

Figures are drawn on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so making
a report neither needs a display nor switches the backend of the caller (a notebook, say). Word
clouds use a fixed `random_state`: the same run gives the same images.
"""

from __future__ import annotations

import html
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm  # in Jupyter a notebook widget, elsewhere the text bar

from flax_gpt import storage
from flax_gpt.data.shards import open_split, read_manifest
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import CheckpointError, ConfigError
from flax_gpt.generate import load_model
from flax_gpt.process import progress
from flax_gpt.report.plots import (
    cloud_image,
    plot_clouds,
    plot_corpus,
    plot_loss,
    plot_lr,
    plot_perplexity,
    plot_throughput,
    slug,
)
from flax_gpt.report.series import MEAN_TPS_DEFINITION, mean_mfu, mean_tokens_per_sec, read_series
from flax_gpt.train.metric_keys import LOSS, PERPLEXITY, STEP, TOKENS_SEEN, VAL_LOSS
from flax_gpt.train.run_dir import RunDir

DEFAULT_PROMPTS = ("the role of recommender systems", "clustering", "transformers for text generation")
REPORT_DIR = "report"
CORPUS_TOKEN_CAP = 300_000  # enough text for a stable word cloud; decoding more only costs time


# ----------------------------------------------------------------------------- inputs


def corpus_text(shards_dir: Path, manifest: dict, cap: int = CORPUS_TOKEN_CAP) -> str:
    """Decoded text of (up to `cap` tokens of) the training split, documents split at EOS."""
    rows = open_split(shards_dir, "train")
    n = min(rows.num_rows, max(1, cap // rows.seq_len))
    # Contiguous rows keep documents whole; spread over the split in 8 blocks for a fair sample.
    blocks = np.array_split(np.arange(rows.num_rows), 8)
    idx = np.concatenate([b[: -(-n // 8)] for b in blocks if b.size])[:n]
    flat = rows.rows(idx).reshape(-1)
    tok = load_tokenizer(manifest["tokenizer"]["name"])
    docs = np.split(flat, np.flatnonzero(flat == rows.eos_id))
    return "\n".join(tok.decode(d[d != rows.eos_id]) for d in docs if d.size > 1)


# ----------------------------------------------------------------------------- summary + html


def summarize(train: list[dict], evals: list[dict], run: RunDir) -> dict:
    last_eval = evals[-1] if evals else {}
    ckpt = run.checkpoints
    return {
        "steps": int(train[-1][STEP]),
        "tokens_seen": train[-1].get(TOKENS_SEEN),
        "final_train_loss": train[-1].get(LOSS),
        "last_eval_step": last_eval.get(STEP),
        "val_loss": last_eval.get(VAL_LOSS),
        "perplexity": last_eval.get(PERPLEXITY),
        "best_val_loss": min((e[VAL_LOSS] for e in evals), default=None),
        "mean_tokens_per_sec": mean_tokens_per_sec(train),
        "mean_tokens_per_sec_definition": MEAN_TPS_DEFINITION,
        "mean_mfu": mean_mfu(train),
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
border-left:3px solid #99c}.note{color:#a40}.def{color:#555;font-size:.9em}b.prompt{color:#236}"""


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
        ("checkpoints", ", ".join(map(str, summary["checkpoints"])) or None)])
        + f"<p class='def'>mean tokens/s: {html.escape(MEAN_TPS_DEFINITION)}.</p>")
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


class Phases:
    """One line per phase through `say`, with the seconds since the report began: on a large run
    sampling and the word clouds take minutes, and a silent wait reads as a hang."""

    def __init__(self, say):
        self.say, self.t0 = say, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.say(f"report [{time.perf_counter() - self.t0:6.1f} s]: {what}")


def sample_texts(run_dir: Path, prompts: Sequence[str], samples: int, max_new_tokens: int, seed: int,
                 *, progress: bool) -> dict[str, list[str]]:
    """{prompt: continuations}, one generate call per prompt so the bar can count samples (prompts
    of up to 16 tokens share one compiled shape), each prompt with its own seed so a run's report
    is the same every time; raises the checkpoint's or the length check's error."""
    model = load_model(run_dir=run_dir)
    texts = {}
    with tqdm(total=samples * len(prompts), desc="report: samples", unit="sample", file=sys.stderr,
              disable=not progress, mininterval=0) as bar:
        for i, p in enumerate(prompts):
            flat = model.generate([p], max_new_tokens=max_new_tokens, seed=seed + i, num_samples=samples, top_p=0.95)
            texts[p] = [t[len(p):] if t.startswith(p) else t for t in flat]  # the clouds show the continuation
            bar.update(samples)
    return texts


def write_report(run_dir, *, samples: int = 10, max_new_tokens: int = 64,
                 prompts: Sequence[str] = DEFAULT_PROMPTS, say=progress, progress: bool = True) -> Path:
    """Write RUN_DIR/report/{*.png, index.html, summary.json}; return the index.html path.

    `samples` continuations of `max_new_tokens` per prompt (0: none). Parts whose inputs are missing
    (no shards here, no checkpoint yet) are left out with a note; a missing metrics.jsonl is an error.
    `say` gets one line per phase and the notes; `progress` shows a tqdm bar over the samples.
    """
    phase = Phases(say)
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ConfigError(f"run directory {run.shown} does not exist; pass the train.run_dir of a trained run")
    cfg = run.config()
    train, evals = read_series(run)
    # Said once the inputs are read: a run directory that cannot be reported on gets only its error line.
    phase(f"read {len(train)} training and {len(evals)} evaluation records of metrics.jsonl")
    notes: list[str] = []
    # Sample first: a bad --max-new-tokens fails here, before any file is written.
    texts: dict[str, list[str]] = {}
    if samples > 0 and prompts:
        phase(f"loading the latest checkpoint; sampling {samples} continuation(s) of {max_new_tokens} tokens "
              f"for each of {len(prompts)} prompt(s)")
        try:
            texts = sample_texts(run.path, prompts, samples, max_new_tokens, cfg.train.seed, progress=progress)
        except CheckpointError as e:
            notes.append(f"Samples left out: {e}")
    target = run.path / REPORT_DIR
    storage.check_output(target, "report", reuse=True)
    out = storage.staging_folder(target) if storage.is_remote(target) else Path(str(target))
    storage.mark(out, "report")
    phase("plots: loss, perplexity, learning rate, throughput")
    figures = [
        (plot_loss(out, train, evals), "Training loss (per step) and validation loss (markers) against optimizer "
                                       "steps; the top axis counts the training tokens seen."),
        (plot_perplexity(out, evals, train[-1][STEP]),
         f"Validation perplexity, exp(validation loss), on a log scale: each of the {len(evals)} evaluation(s) "
         "in metrics.jsonl is a marker, over the whole run's steps."),
        (plot_lr(out, train), "Learning rate applied at each step (the optimizer's schedule)."),
        (plot_throughput(out, train), "Training throughput in tokens per second over all devices (and MFU where "
                                      "the device's peak is known); step 1 compiles and is not timed. "
                                      f"The dashed mean: {MEAN_TPS_DEFINITION}."),
    ]

    clouds, manifest = [], None
    shards = run.shards(cfg)
    if shards is None:
        notes.append(f"Corpus plots left out: no manifest.json at data.shards_dir={cfg.data.shards_dir} "
                     f"(relative to where training ran); run the report from that directory.")
    else:
        phase("corpus: length histograms; decoding the training split for its word cloud")
        manifest = read_manifest(shards)
        synthetic = " (synthetic)" if manifest["source"].get("synthetic") else ""
        figures.append((plot_corpus(out, manifest), f"Document lengths of the whole corpus{synthetic}, in words "
                        "and in tokens, with mode, mean and median (each line ends in its own marker); the grey "
                        "line is the pad/truncate length."))
        clouds.append(("corpus", f"training corpus{synthetic}", corpus_text(shards, manifest)))

    clouds += [(slug(p), f"samples: “{p}”", "\n".join(ts)) for p, ts in texts.items()]
    if clouds:
        phase(f"word clouds ({len(clouds)})")
        combined, singles = plot_clouds(out, [(n, t, cloud_image(text)) for n, t, text in clouds])
        figures.append((combined, "Word clouds (English stopwords and LaTeX/markup removed) of the training "
                        "corpus and of the generated continuations of each prompt, side by side."))
        figures += [(n, f"The same word cloud on its own: {t}.") for n, (_, t, _) in zip(singles, clouds)]

    phase("writing summary.json and index.html")
    summary = summarize(train, evals, run)
    (out / "summary.json").write_text(json.dumps({**summary, "samples": texts, "notes": notes}, indent=1) + "\n")
    for n in notes:
        say(f"note: {n}")
    index = write_html(out, run.path, cfg, summary, figures, manifest, texts, notes)
    if storage.is_remote(target):  # built locally, then uploaded into the bucket run directory
        phase(f"uploading to {target}")
        storage.publish_folder(out, target)
        index = target / index.name
    phase("done")
    return index
