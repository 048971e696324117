"""The Hugging Face model card (README.md) of an export: pure text from what the run directory
records (config, metrics.jsonl, the shards' manifest.json). The hyperparameter table lists the
settings the config declares for the card (`setting(..., card=...)`), nothing hand-kept here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax_gpt.data.sources import source_fingerprint
from flax_gpt.hub import is_hub_id
from flax_gpt.model.family import family_of, param_count
from flax_gpt.train.metric_keys import PERPLEXITY, STEP, VAL_LOSS
from flax_gpt.train.run_dir import RunDir

# The usage snippet cannot know where the folder will live; the user substitutes this.
MODEL_ID_PLACEHOLDER = "path/to/this/folder"


def describe_data(data_cfg, manifest: dict | None) -> tuple[str, bool]:
    """(one-sentence description of the training corpus, whether it is synthetic).

    The shards' manifest records both, next to the corpus fingerprint `prepare` computed, so the
    card never opens the corpus again. Without the manifest (shards moved or deleted since
    training) the config describes it: hashing local files only to name them would read the whole
    corpus, and they may have changed since."""
    if manifest:
        return str(manifest["source"]["description"]), bool(manifest["source"].get("synthetic"))
    src = data_cfg.source
    if isinstance(src, str) and src.strip() == "synthetic":  # described by its settings: nothing is read
        _, desc, _ = source_fingerprint(data_cfg)
        return str(desc), True
    return (f"Hugging Face dataset {src}" if is_hub_id(src) else f"{src}"), False


def final_validation(run: RunDir) -> dict | None:
    """The last metrics.jsonl record with a `val_loss`, or None."""
    try:
        records = run.metrics()
    except (OSError, ValueError):
        return None
    evals = [r for r in records if VAL_LOSS in r]
    return evals[-1] if evals else None


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) and not isinstance(n, bool) else "unknown"


def model_card(run: RunDir, cfg, step: int, meta: dict | None, *, license: str = "apache-2.0") -> str:
    """README.md for an export: YAML front matter the Hub reads, then what, how and how well.

    `license` defaults to the project's own (Apache-2.0); GPT-2's released weights are MIT, which
    permits that for fine-tunes, but pass another SPDX id when the data's terms require it."""
    meta = meta or {}
    m, d = cfg.model, cfg.data
    manifest = run.manifest(cfg)
    data_desc, synthetic = describe_data(d, manifest)
    hub_dataset = d.source if (not synthetic and is_hub_id(d.source)) else None
    family = family_of(m)
    n_params = param_count(dataclasses.replace(m, pad_vocab_to=0))  # as exported: vocab padding stripped
    front = _front_matter(family.name, license, synthetic, hub_dataset,
                          base_model=m.init_from if is_hub_id(m.init_from) else None)
    lines = _intro(m, family, n_params, step, source=meta.get("source"))  # import-hf records the weights' origin
    lines += _data_section(d, manifest, data_desc, synthetic, hub_dataset)
    lines += _results_section(run, step, meta)
    lines += _hyperparameters_section(cfg, n_params)
    lines += _usage_section()
    return "\n".join(front + lines)


def _front_matter(family_name: str, license: str, synthetic: bool, hub_dataset: str | None,
                  base_model: str | None) -> list[str]:
    tags = [family_name, "text-generation", "jax", "flax", "flax_gpt"] + (["synthetic-data"] if synthetic else [])
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {license}", "tags:"]
    front += [f"- {tag}" for tag in tags]
    if hub_dataset:
        front += ["datasets:", f"- {hub_dataset}"]
    if base_model:
        front += [f"base_model: {base_model}"]
    return front + ["---", ""]


def _intro(m, family, n_params: int, step: int, source: str | None) -> list[str]:
    title = (f"# {family.label} ({m.n_layer} layers, {m.n_embd} wide, {n_params / 1e6:.1f}M parameters) "
             "trained with flax_gpt")
    if step == 0 and source:
        return [title, "", f"Weights imported from `{source}` (step 0: not trained by flax_gpt).", ""]
    return [title, "", (f"A {family.label} language model trained from "
                        f"{'`' + m.init_from + '`' if m.init_from else 'scratch'} with "
                        "flax_gpt (JAX/Flax) and exported to a `transformers` "
                        f"`{family.hf_architecture}` (safetensors)."), ""]


def _data_section(d, manifest: dict | None, data_desc: str, synthetic: bool, hub_dataset: str | None) -> list[str]:
    lines = ["## Training data", ""]
    if synthetic:
        lines += [("**The corpus is synthetic**: machine-generated ML-abstract-like text from flax_gpt's "
                   "seeded generator, not real text. This model is a pipeline test, not a useful language model."), ""]
    lines += [f"- Source: {data_desc}"]
    if hub_dataset:
        lines += [f"- Hub dataset: [{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})"
                  + (f", split `{d.hf_split}`" if d.hf_split else "")]
    lines += ["- Text: " + (f"template `{d.template!r}`" if d.template else f"column `{d.text_column}`"),
              (f"- Tokenizer: `{d.tokenizer}`; sequences of {d.seq_len} tokens ({d.packing}ed), "
               f"{d.val_fraction:.0%} held out for validation")]
    return lines + _corpus_counts(manifest or {}) + [""]


def _corpus_counts(manifest: dict) -> list[str]:
    """The document and per-split token counts the manifest records (none it lacks)."""
    lines = []
    stats = manifest.get("stats") or {}
    if isinstance(stats.get("documents"), int):
        lines += [f"- Documents: {stats['documents']:,}"]
    splits = manifest.get("splits") or {}
    for name, label in (("train", "Training"), ("val", "Validation")):
        split = splits.get(name)
        if isinstance(split, dict) and isinstance(split.get("tokens"), int):
            docs = f" from {split['documents']:,} documents" if isinstance(split.get("documents"), int) else ""
            lines += [f"- {label} split: {split['tokens']:,} tokens{docs}"]
    return lines


def _results_section(run: RunDir, step: int, meta: dict) -> list[str]:
    lines = ["## Results", "", f"- Checkpoint step: {step}", f"- Tokens seen: {_fmt_int(meta.get('tokens_seen'))}"]
    final = final_validation(run)
    if final is None:
        return lines + ["- Validation loss: not recorded", ""]
    loss = float(final[VAL_LOSS])
    ppl = final.get(PERPLEXITY)
    ppl = float(ppl) if isinstance(ppl, (int, float)) else (math.exp(loss) if loss < 700 else float("inf"))
    return lines + [f"- Final validation loss: {loss:.4f} (at step {final.get(STEP, '?')})",
                    f"- Validation perplexity: {ppl:.2f}", ""]


def _hyperparameters_section(cfg, n_params: int) -> list[str]:
    rows = card_settings(cfg)
    rows.insert(4, ("parameters", f"{n_params:,}"))
    return (["## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
            + [f"| {k} | {v} |" for k, v in rows]
            + ["", "The full resolved configuration is in `training_config.json`.", ""])


def _usage_section() -> list[str]:
    return ["## Usage", "", "```python", "from transformers import pipeline", "",
            f'generator = pipeline("text-generation", model="{MODEL_ID_PLACEHOLDER}")  # or the Hub repo id',
            'print(generator("In this paper we", max_new_tokens=40, do_sample=True, top_p=0.95)[0]["generated_text"])',
            "```", "", "Or with flax_gpt's JAX sampler:", "", "```bash",
            f"flax-gpt generate --hf {MODEL_ID_PLACEHOLDER} --prompt \"In this paper we\" --top-p 0.95", "```", ""]


def card_settings(cfg) -> list[tuple[str, str]]:
    """(label, value) of every setting the config declares for the model card, in config order."""
    rows = []
    for _name, _, f, value in cfg.items():
        if f.metadata["card"] and value not in ("", None, []):
            rows.append((f.metadata["card"], f"{value:g}" if isinstance(value, float) else str(value)))
    return rows
