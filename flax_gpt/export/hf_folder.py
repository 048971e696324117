"""The export side of the HF bridge: write a `transformers` folder of the model's family (safetensors,
tokenizer, generation config, model card), reload it with transformers, compare logits with ours,
and only then put it in place.

The folder is built in a temporary sibling and moved into place after the check, so a failed
write or check never leaves half an export and never touches an existing folder. The target must
be a new or empty folder, or an earlier export (replaced only with `overwrite`, and only while it
holds nothing but the files its marker lists: whatever else a user put there is refused, not
deleted); it may never be or sit inside a run directory or shards folder (`storage.check_output`).
torch is imported lazily, only by the reload check.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from flax_gpt import storage
from flax_gpt.config import ModelConfig
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import HFError, StorageError, UserError
from flax_gpt.export.card import model_card
from flax_gpt.model.family import model, to_hf
from flax_gpt.train.run_dir import RunDir


def export_hf(params: dict, cfg: ModelConfig, out_dir, *, tokenizer: str = "gpt2",
              dtype: str = "float32", overwrite: bool = False, extra_files: dict[str, str] | None = None,
              check=None, origin: str = "") -> Path:
    """Write an HF model folder (the family's transformers class); `check(folder)` runs on the finished
    local folder before it is put in place (moved, or for a bucket uploaded). `origin`: the run it was
    exported from, recorded in the folder's marker."""
    out = out_dir
    storage.check_output(out, "export", overwrite=overwrite)
    storage.check_writable(out, "export folder")
    storage.clean_temp_siblings(out)
    tmp = storage.staging_folder(out)
    try:
        try:
            _write_folder(tmp, params, cfg, tokenizer, dtype, extra_files, origin)
        except Exception as e:  # noqa: BLE001 - a full disk reaches us as OSError or a Rust writer's own type
            raise _write_error(e, out) from None
        if check is not None:
            check(tmp)
        storage.check_output(out, "export", overwrite=overwrite)  # again: nothing was put there meanwhile
        storage.publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_folder(tmp: Path, params: dict, cfg: ModelConfig, tokenizer: str, dtype: str,
                  extra_files: dict[str, str] | None, origin: str) -> None:
    """The export's files in the staging folder `tmp`, its marker last (listing them)."""
    tok = load_tokenizer(tokenizer)
    hf_cfg, sd = to_hf(params, cfg, tok.eos_id)
    if dtype == "bfloat16":
        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    hf_cfg["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id,
           "do_sample": True, "max_length": cfg.n_positions}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok.save_hf(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    storage.make_readable(tmp)
    # The files it wrote, listed: an overwrite later replaces this folder only if it holds no others.
    storage.mark(tmp, "export", files=sorted(p.name for p in tmp.iterdir()),
                 **({"origin": origin} if origin else {}))


def _write_error(e: Exception, out) -> Exception:
    """A failed write of the staging folder (a full disk, say) as one line; anything else as it is.
    Nothing was put in place: an earlier export at `out` is unchanged."""
    os_error = storage.os_error_of(e)
    if os_error is None or isinstance(e, UserError):
        return e
    kept = "the earlier export there is unchanged" if storage.folder_kind(out) == "export" else \
        "nothing was written there"
    return StorageError(f"could not write the export {out} ({storage.error_reason(os_error)}); {kept}; "
                        "free disk space or choose another folder, then run the same command again")


def probe_tokens(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int32)


def require_torch() -> None:
    """The export check loads the folder with transformers' PyTorch model class."""
    try:
        import torch  # noqa: F401  (deferred: torch is only needed to check exports)
    except ImportError:
        raise HFError("checking an export loads it with transformers, which needs PyTorch: "
                      "pip install torch==2.13.0 (the CPU wheel is enough)") from None


def torch_logits(hf_dir: str | Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of the exported folder loaded by transformers (float32, CPU)."""
    require_torch()
    import torch  # deferred: heavy, and only the export check needs it
    from transformers import AutoModelForCausalLM  # deferred with torch

    # The class config.json names by its model_type, the family's own.
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def verify_export(hf_dir: str | Path, jax_logits_fn, cfg: ModelConfig, *, atol: float) -> float:
    """Reload the export with transformers and compare logits with ours on a probe batch.

    Returns the max abs difference; raises HFError when it exceeds `atol`.
    """
    tokens = probe_tokens(cfg.vocab_size, length=min(16, cfg.n_positions))
    ours = np.asarray(jax_logits_fn(tokens))[..., : cfg.vocab_size]
    theirs = torch_logits(hf_dir, tokens)
    diff = float(np.max(np.abs(ours - theirs)))
    if not diff <= atol:
        raise HFError(f"export check failed: transformers' logits differ from ours by {diff:.3g} "
                      f"(allowed {atol:.1g}); the export at {hf_dir} is not faithful")
    return diff


def export_run(run_dir, out, *, step=None, dtype: str = "float32", overwrite: bool = False, loaded=None):
    """`flax-gpt export`: a run's checkpoint -> HF folder with model card, reloaded and compared.
    `loaded`: (config, params, step, meta) of that checkpoint already in memory, as `RunDir.load_params`
    returns them (the end of training passes its own), else it is read from the run directory.

    Returns (folder, max logit difference against transformers)."""
    storage.check_output(out, "export", overwrite=overwrite)  # fail before loading anything
    storage.check_writable(out, "export folder")
    require_torch()
    run = RunDir(run_dir)
    cfg, params, chosen, meta = loaded or run.load_params(step)
    host = jax.device_get(params)
    if dtype == "bfloat16":  # compare against exactly the weights transformers will read
        host = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), host)
    fp32 = dataclasses.replace(cfg.model, dtype="float32")
    apply = jax.jit(lambda p, t: model(fp32).apply({"params": p}, t))
    diffs = []

    def check(folder):
        diffs.append(verify_export(folder, lambda t: apply(host, t), cfg.model, atol=2e-3))

    extra = {"README.md": model_card(run, cfg, chosen, meta),
             "training_config.json": json.dumps(cfg.to_dict(), indent=2)}
    path = export_hf(host, cfg.model, out, tokenizer=cfg.data.tokenizer, dtype=dtype, overwrite=overwrite,
                     extra_files=extra, check=check, origin=str(run.path))
    return path, diffs[0]
