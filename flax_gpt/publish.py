"""Publishing an export: the Hugging Face model card (README.md) and the push to the Hub.

`model_card` is pure text from what the run directory records (config, metrics.jsonl, the shards'
manifest.json); `export_run` writes it into the export folder. `push_to_hub` uploads an export
folder with `huggingface_hub`; every Hub failure becomes one `HFError` line that says the local
export is kept. The access token is never printed, logged, or put in an error message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from flax_gpt.flops import param_count
from flax_gpt.hf_io import HFError

# The usage snippet cannot know where the folder will live; the user substitutes this.
MODEL_ID_PLACEHOLDER = "path/to/this/folder"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(value: Any) -> bool:
    text = str(value).strip() if isinstance(value, str) else ""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~")) and not Path(text).exists()


def read_manifest(shards_dir: str | Path, run_dir: str | Path | None = None) -> dict | None:
    """The shards' manifest.json (shards_dir as given, else relative to the run's parent), or None."""
    candidates = [Path(shards_dir) / "manifest.json"]
    if run_dir is not None and not Path(shards_dir).is_absolute():
        candidates.append(Path(run_dir).parent / shards_dir / "manifest.json")
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                return None
            return data if isinstance(data, dict) else None
    return None


def describe_data(data_cfg, manifest: dict | None) -> tuple[str, bool]:
    """(one-sentence description of the training corpus, whether it is synthetic)."""
    desc, synthetic = None, data_cfg.source == "synthetic"
    if manifest:
        src = manifest.get("source")
        if isinstance(src, dict):
            desc = src.get("description") or src.get("desc")
            synthetic = bool(src.get("synthetic", synthetic))
        elif isinstance(src, str) and src:
            desc = src
        desc = desc or manifest.get("source_description") or manifest.get("description")
        synthetic = bool(manifest.get("synthetic", synthetic))
    if not desc:
        try:
            from flax_gpt.data.sources import source_fingerprint

            _, desc, synthetic = source_fingerprint(data_cfg)
        except Exception:  # noqa: BLE001 - the files may be gone since training; the card still gets written
            src = data_cfg.source
            desc = (f"Hugging Face dataset {src}" if _is_hub_id(src) else f"{src}")
    return str(desc), synthetic


def final_validation(run_dir: str | Path) -> dict | None:
    """The last metrics.jsonl record with a `val_loss`, or None."""
    from flax_gpt.metrics import read_metrics

    try:
        records = read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    evals = [r for r in records if "val_loss" in r]
    return evals[-1] if evals else None


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) and not isinstance(n, bool) else "unknown"


def model_card(run_dir: str | Path, cfg, step: int, meta: dict | None, *, license: str = "apache-2.0") -> str:
    """README.md for an export: YAML front matter the Hub reads, then what, how and how well.

    `license` defaults to the project's own (Apache-2.0); GPT-2's released weights are MIT, which
    permits that for fine-tunes, but pass another SPDX id when the data's terms require it."""
    meta = meta or {}
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    manifest = read_manifest(d.shards_dir, run_dir)
    data_desc, synthetic = describe_data(d, manifest)
    hub_dataset = d.source if (not synthetic and _is_hub_id(d.source)) else None
    base_model = m.init_from if _is_hub_id(m.init_from) else None
    source_meta = meta.get("source")  # import-hf records where the weights came from

    tags = ["gpt2", "text-generation", "jax", "flax", "flax_gpt"] + (["synthetic-data"] if synthetic else [])
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {license}", "tags:"]
    front += [f"- {tag}" for tag in tags]
    if hub_dataset:
        front += ["datasets:", f"- {hub_dataset}"]
    if base_model:
        front += [f"base_model: {base_model}"]
    front += ["---", ""]

    n_params = param_count(dataclasses.replace(m, pad_vocab_to=0))  # as exported: vocab padding stripped
    title = f"# GPT-2 ({m.n_layer} layers, {m.n_embd} wide, {n_params / 1e6:.1f}M parameters) trained with flax_gpt"
    lines = [title, ""]
    if step == 0 and source_meta:
        lines += [f"Weights imported from `{source_meta}` (step 0: not trained by flax_gpt).", ""]
    else:
        lines += [f"A GPT-2 language model trained from "
                  f"{'`' + m.init_from + '`' if m.init_from else 'scratch'} with "
                  "flax_gpt (JAX/Flax) and exported to a `transformers` "
                  "`GPT2LMHeadModel` (safetensors).", ""]

    lines += ["## Training data", ""]
    if synthetic:
        lines += ["**The corpus is synthetic**: machine-generated ML-abstract-like text from flax_gpt's "
                  "seeded generator, not real text. This model is a pipeline test, not a useful language model.", ""]
    lines += [f"- Source: {data_desc}"]
    if hub_dataset:
        lines += [f"- Hub dataset: [{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})"
                  + (f", split `{d.hf_split}`" if d.hf_split else "")]
    lines += ["- Text: " + (f"template `{d.template!r}`" if d.template else f"column `{d.text_column}`"),
              f"- Tokenizer: `{d.tokenizer}`; sequences of {d.seq_len} tokens ({d.packing}ed), "
              f"{d.val_fraction:.0%} held out for validation"]
    stats = (manifest or {}).get("stats") or {}
    if isinstance(stats.get("documents"), int):
        lines += [f"- Documents: {stats['documents']:,}"]
    splits = (manifest or {}).get("splits") or {}
    for name in ("train", "val"):
        split = splits.get(name)
        if isinstance(split, dict) and isinstance(split.get("tokens"), int):
            docs = f" from {split['documents']:,} documents" if isinstance(split.get("documents"), int) else ""
            lines += [f"- {'Training' if name == 'train' else 'Validation'} split: {split['tokens']:,} tokens{docs}"]
    lines += [""]

    lines += ["## Results", "", f"- Checkpoint step: {step}",
              f"- Tokens seen: {_fmt_int(meta.get('tokens_seen'))}"]
    final = final_validation(run_dir)
    if final is not None:
        loss = float(final["val_loss"])
        ppl = final.get("perplexity")
        ppl = float(ppl) if isinstance(ppl, (int, float)) else (math.exp(loss) if loss < 700 else float("inf"))
        lines += [f"- Final validation loss: {loss:.4f} (at step {final.get('step', '?')})",
                  f"- Validation perplexity: {ppl:.2f}"]
    else:
        lines += ["- Validation loss: not recorded"]
    lines += [""]

    lines += ["## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    rows = [
        ("layers / width / heads", f"{m.n_layer} / {m.n_embd} / {m.n_head}"),
        ("MLP width", m.d_ff), ("context (n_positions)", m.n_positions), ("vocab", m.vocab_size),
        ("parameters", f"{n_params:,}"), ("compute dtype", m.dtype),
        ("sequence length", d.seq_len), ("batch size (sequences)", t.batch_size),
        ("gradient accumulation", t.grad_accum), ("steps (configured)", t.steps), ("seed", t.seed),
        ("optimizer", f"AdamW (b1={o.b1}, b2={o.b2}, eps={o.eps:g}, weight decay={o.weight_decay})"),
        ("learning rate", f"{o.learning_rate:g}, warmup {o.warmup_steps} steps, " + (
            f"decay x{o.decay_rate} every {o.decay_steps} steps{' (staircase)' if o.staircase else ''}"
            if o.decay_rate != 1.0 else "then constant")),
        ("gradient clipping", f"global norm {o.clip_norm}" if o.clip_norm else "off"),
        ("dropout (embd / attn / resid)", f"{m.embd_pdrop} / {m.attn_pdrop} / {m.resid_pdrop}"),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "The full resolved configuration is in `training_config.json`.", ""]

    lines += ["## Usage", "", "```python", "from transformers import pipeline", "",
              f'generator = pipeline("text-generation", model="{MODEL_ID_PLACEHOLDER}")  # or the Hub repo id',
              'print(generator("In this paper we", max_new_tokens=40, do_sample=True, top_p=0.95)[0]["generated_text"])',
              "```", "", "Or with flax_gpt's JAX sampler:", "", "```bash",
              f"flax-gpt generate --hf {MODEL_ID_PLACEHOLDER} --prompt \"In this paper we\" --top-p 0.95", "```", ""]
    return "\n".join(front + lines)


def _is_connection_error(e: BaseException) -> bool:
    """Network-level failure (refused, DNS, timeout) rather than an HTTP answer from the Hub.

    Matched by class name: the HTTP client behind huggingface_hub has changed (requests, httpx,
    httpx2) and each names its transport errors this way."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        return False
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "RequestError", "ConnectionError", "Timeout", "TimeoutException",
                         "OfflineModeIsEnabled"}) or isinstance(e, (OSError, TimeoutError))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, endpoint: str | None = None) -> str:
    """Upload an export folder to the Hub repo `repo_id` (created if missing); returns its URL.

    Token: `token`, else `HF_TOKEN`, else the standard `hf auth login` token (huggingface_hub's own
    resolution). `revision` names a branch, created when missing. `endpoint` overrides the Hub URL
    (default: `HF_ENDPOINT` or huggingface.co). Any Hub failure raises one-line `HFError`; the
    local folder is only read, never changed.
    """
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise HFError(f"{folder} is not an export folder (no config.json); run `flax-gpt export` first")
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise HFError("pushing needs the package huggingface_hub; run `pip install huggingface_hub`") from None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                          commit_message="Upload GPT-2 exported by flax_gpt")
    except Exception as e:  # noqa: BLE001 - network, HTTP and auth failures all end the same way
        reason = " ".join(str(e).split()) or type(e).__name__
        reason = _scrub(f"{type(e).__name__}: {reason}", token)
        if len(reason) > 300:
            reason = reason[:297] + "..."
        what = "could not reach the Hugging Face Hub to push" if _is_connection_error(e) else \
            "the Hugging Face Hub refused the push to"
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("; set HF_TOKEN to a token with write access or run `hf auth login`"
                if status in (401, 403) else "")
        raise HFError(f"{what} {repo_id}: {reason}{hint}; the local export at {folder} is kept") from None
    url = str(repo_url).rstrip("/")
    return f"{url}/tree/{revision}" if revision else url
