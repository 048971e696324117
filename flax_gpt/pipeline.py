"""What each verb does, end to end: train (check -> prepare -> fit -> export -> samples), eval,
import-hf, and the model sources generate and the API load from.

The CLI and the notebook API (`flax_gpt.api`) both call these; they hold no math of their own.
Every output location is checked before any work starts (`storage.check_output`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from flax_gpt import storage
from flax_gpt.config import Config, DataConfig, MeshConfig
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.shards import open_split
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import ConfigError, OutputError
from flax_gpt.export.hf_folder import export_run, require_torch
from flax_gpt.generate import LoadedModel, folder_tokenizer, load_model
from flax_gpt.model.family import load_hf
from flax_gpt.model.hf import read_hf_folder, resolve_source
from flax_gpt.sharding import make_mesh
from flax_gpt.train.evaluate import Evaluator
from flax_gpt.train.inputs import ensure_shards, open_splits
from flax_gpt.train.metric_keys import STEP
from flax_gpt.train.run_dir import RunDir
from flax_gpt.train.run_lock import check_free
from flax_gpt.train.state import StateBuilder, total_steps
from flax_gpt.train.trainer import Trainer


def check_outputs(cfg: Config, *, overwrite_export: bool = False) -> bool:
    """Everything `train` will write, checked before anything runs. True when resuming.

    The end of training replaces `train.export_dir` only when it is new, empty or this run's own
    export; another run's export is replaced only with `overwrite_export` (`train --overwrite`)."""
    run = RunDir(cfg.train.run_dir)
    resuming = run.check(cfg)
    shards = storage.location(cfg.data.shards_dir)
    if shards == run.path or run.checkpoints in (shards, *shards.parents):
        raise OutputError(f"data.shards_dir={cfg.data.shards_dir} is the run directory or inside its "
                          "checkpoints; choose a folder of its own")
    if cfg.train.export_dir:
        out = storage.location(cfg.train.export_dir)
        for name, other in (("train.run_dir", run.path), ("data.shards_dir", shards)):
            if out == other or other in out.parents or out in other.parents:
                raise OutputError(f"train.export_dir={cfg.train.export_dir} overlaps {name}={other}; "
                                  "export to a folder of its own, e.g. exports/<name>")
        if storage.check_output(out, "export", reuse=True) and not overwrite_export:
            origin = storage.marker_of(out).get("origin")
            if origin != str(run.path):
                raise OutputError(f"train.export_dir={cfg.train.export_dir} already holds an export of "
                                  f"{origin or 'another run'}; pass --overwrite to replace it when training "
                                  "ends, or set train.export_dir to a new folder")
        storage.check_writable(out, "train.export_dir")
        require_torch()  # the export is checked by loading it with transformers
    return resuming


def say_now(line: str) -> None:
    """A progress line on stdout, flushed: a pipe or log file sees each phase as it starts."""
    print(line, flush=True)


def train(cfg: Config, *, overwrite_data: bool = False, overwrite_export: bool = False, say=say_now,
          on_record=None) -> tuple[dict, tuple[int, dict, dict] | None]:
    """`flax-gpt train`: (the result the CLI prints, `Trainer.final`: the last step's (step, params,
    meta) in device memory, None when this call did not train to the end). The export and samples
    at the end use those parameters, not a re-read checkpoint (`trained_model` for the API)."""
    resuming = check_outputs(cfg, overwrite_export=overwrite_export)
    ensure_shards(cfg, overwrite=overwrite_data)
    train_rows, val_rows = open_splits(cfg)
    builder = StateBuilder(cfg, total_steps(cfg, train_rows.num_rows), eos_id=train_rows.eos_id)  # mesh errors: early
    if jax.process_index() == 0:
        say(f"{'resuming' if resuming else 'training'} {cfg.model.preset} ({cfg.model.n_layer} layers, "
            f"{cfg.model.n_embd} wide) for {builder.total_steps} steps of {cfg.train.batch_size}x"
            f"{cfg.data.seq_len} tokens on {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"mesh {dict(builder.mesh.shape)}")
    trainer = Trainer(cfg, builder, say=say, on_record=on_record)
    result = trainer.fit(train_rows, val_rows)
    if result.get("preempted") or not (cfg.train.export_dir or cfg.train.sample_prompts):
        return result, trainer.final
    trained = _trained(cfg, trainer.final)  # on every process: gathering is a collective
    if cfg.train.export_dir and jax.process_index() == 0:
        out, diff = export_run(cfg.train.run_dir, cfg.train.export_dir, overwrite=True, loaded=trained)
        result["export_dir"] = str(out)
        say(f"exported to {out} (transformers reload checked, max logit diff {diff:.1e})")
    if cfg.train.sample_prompts and jax.process_index() == 0:
        model = _loaded_model(cfg, trained)
        texts = model.generate(list(cfg.train.sample_prompts), max_new_tokens=cfg.train.sample_max_new_tokens,
                               seed=cfg.train.seed, top_p=0.95)
        for prompt, text in zip(cfg.train.sample_prompts, texts):
            say(f"\n--- sample: {prompt!r}\n{text}")
    return result, trainer.final


def trained_model(cfg: Config, final: tuple[int, dict, dict] | None) -> LoadedModel:
    """The model `train` returned `final` for: from memory, or the run's latest checkpoint (None)."""
    return _loaded_model(cfg, _trained(cfg, final))


def _trained(cfg: Config, final: tuple[int, dict, dict] | None) -> tuple[Config, dict, int, dict]:
    """(config, params on the host, step, meta) of the trained model, as `RunDir.load_params` returns a
    checkpoint's: the last step's parameters from memory (every process gathers them, a
    collective), or the latest checkpoint when this call trained no step."""
    if final is None:
        cfg, params, step, meta = RunDir(cfg.train.run_dir).load_params()
        return cfg, jax.device_get(params), step, meta
    step, params, meta = final
    if jax.process_count() == 1:
        return cfg, jax.device_get(params), step, meta
    return cfg, multihost_utils.process_allgather(params, tiled=True), step, meta  # global arrays, whole


def _loaded_model(cfg: Config, trained: tuple[Config, dict, int, dict]) -> LoadedModel:
    _, params, step, _ = trained
    return LoadedModel(params, dataclasses.replace(cfg.model, remat="none"), load_tokenizer(cfg.data.tokenizer),
                       run_dir=cfg.train.run_dir, step=step)


def evaluate(run_dir=None, *, hf: str | None = None, step=None, data=None, text_column: str | None = None,
             template: str | None = None, seq_len: int | None = None, batch_size: int = 8, say=None) -> dict:
    """`flax-gpt eval`: {step, val_loss, perplexity, tokens, seq_len, data} of a run's checkpoint
    (`step`: N, latest or best) or of an HF folder / Hub id, over the run's validation split, a
    prepared shards folder's validation split, or every document of `data` (any source
    `data.source` accepts) packed exactly as `prepare` packs it. `say` gets progress lines."""
    progress, say = say is not None, say or (lambda _line: None)
    if (run_dir is None) == (hf is None):
        raise ConfigError("eval needs a run directory or --hf HF_DIR (one of them)")
    mesh = make_mesh(MeshConfig())
    shards = data is not None and storage.folder_kind(data) == "shards"
    if shards and (text_column or template):
        raise ConfigError(f"--data {data} is a prepared shards folder; --text-column and --template apply to "
                          "text sources only")
    if hf is not None:
        scored = _hf_scored(hf, step, data, shards, seq_len, batch_size)
    else:
        scored = _run_scored(run_dir, step, mesh, data, shards, seq_len)
    model_cfg = scored.model_cfg
    if scored.seq_len is not None and scored.seq_len > model_cfg.n_positions:
        raise ConfigError(f"--seq-len {scored.seq_len} exceeds the model's context n_positions={model_cfg.n_positions}")
    with tempfile.TemporaryDirectory(prefix="flax_gpt-eval-") as tmp:
        if data is None:
            rows, described = open_splits(scored.cfg)[1], f"validation split of {scored.cfg.data.shards_dir}"
        elif shards:
            rows, described = _shards_rows(data, model_cfg.vocab_size, scored.seq_len)
        else:
            rows, described = _packed_rows(data, text_column, template, scored, Path(tmp) / "shards", say)
        if rows.seq_len > model_cfg.n_positions:
            raise ConfigError(f"{data} holds rows of {rows.seq_len} tokens, more than the model's context "
                              f"n_positions={model_cfg.n_positions}")
        evaluator = Evaluator(model_cfg, mesh, batch_size=scored.batch_size, document_mask=scored.document_mask,
                              packing="pack" if data is not None else scored.cfg.data.packing)
        result = evaluator.evaluate(scored.params, rows, progress=progress)
        return {STEP: scored.step, **result, "seq_len": rows.seq_len, "data": described}


@dataclasses.dataclass
class _Scored:
    """The model `eval` scores and how: from a run directory (`cfg` its config) or an HF folder."""

    model_cfg: Any
    params: Any
    step: int | None  # the checkpoint's step; None for an HF folder
    tokenizer: str
    seq_len: int | None  # None: the rows' own length (a prepared shards folder)
    batch_size: int
    document_mask: bool = False
    cfg: Config | None = None


def _hf_scored(hf: str, step, data, shards: bool, seq_len: int | None, batch_size: int) -> _Scored:
    if data is None:
        raise ConfigError("--hf has no validation split of its own; pass --data SOURCE (files, a dataset "
                          "folder, a Hub dataset or a run's shards folder) to evaluate it on")
    model = load_model(hf=hf, step=step)
    tokenizer = str(model.folder) if model.tokenizer.name != "gpt2" else "gpt2"
    seq_len = seq_len or (None if shards else min(model.cfg.n_positions, 1024))
    return _Scored(model.cfg, model.params, None, tokenizer, seq_len, batch_size)


def _run_scored(run_dir, step, mesh, data, shards: bool, seq_len: int | None) -> _Scored:
    cfg, params, chosen, _ = RunDir(run_dir).load_params(step, mesh=mesh)
    if data is None and seq_len not in (None, cfg.data.seq_len):
        raise ConfigError(f"--seq-len {seq_len} does not apply to the run's own validation split (rows of "
                          f"data.seq_len={cfg.data.seq_len}); pass --data to score other text at another length")
    seq_len = seq_len or (None if shards else cfg.data.seq_len)
    return _Scored(cfg.model, params, chosen, cfg.data.tokenizer, seq_len,
                   cfg.train.eval_batch_size or cfg.train.batch_size, cfg.data.document_mask, cfg)


def _packed_rows(data, text_column: str | None, template: str | None, scored: _Scored, shards_dir: Path, say):
    """Every document of the text source `data`, tokenized and packed into `shards_dir` as `prepare` does."""
    fields = {"text_column": text_column} if text_column else {}
    data_cfg = DataConfig(source=data, template=template or "", tokenizer=scored.tokenizer, seq_len=scored.seq_len,
                          val_fraction=0.0, shards_dir=str(shards_dir), **fields)
    say(f"tokenizing and packing {data} into rows of {scored.seq_len} tokens")
    manifest = prepare_shards(data_cfg, log=None)
    return open_split(data_cfg.shards_dir, "train"), manifest["source"]["description"]


def _shards_rows(shards_dir, vocab_size: int, seq_len: int | None):
    """A prepared shards folder's validation split (its training split when it has none), for eval."""
    rows = open_split(shards_dir, "val", vocab_size=vocab_size, seq_len=seq_len)
    if rows.num_rows:
        return rows, f"validation split of {shards_dir}"
    return open_split(shards_dir, "train", vocab_size=vocab_size, seq_len=seq_len), \
        f"training split of {shards_dir} (it has no validation rows)"


def import_hf(src: str, run_dir: str | Path, *, base: Config | None = None) -> tuple[Config, int]:
    """`flax-gpt import-hf`: an HF folder or Hub id -> a run directory with a weights-only step-0
    checkpoint. The run directory must be new or empty (or an import of ours cut short).

    It is built whole in a staging folder and then put in place (renamed; a bucket one uploaded
    marker first, marked incomplete until the last file), so an import killed midway leaves the
    target as it was, or marked unfinished, and the same command run again completes it."""
    _check_import_target(run_dir)
    base = base or Config()
    model_cfg, params = load_hf(src, dtype=base.model.dtype, pad_vocab_to=base.model.pad_vocab_to)
    cfg = base.replace(model={**dataclasses.asdict(model_cfg), "init_from": src},
                       train={"run_dir": str(run_dir)},
                       data={"seq_len": min(base.data.seq_len, model_cfg.n_positions)}).validate()
    storage.clean_temp_siblings(run_dir)  # what an import killed earlier left
    tmp = storage.staging_folder(run_dir)
    try:
        staged = RunDir(tmp)
        ckpt = staged.checkpointer(async_save=False)
        try:
            ckpt.save(0, params, meta={"source": src})
            ckpt.wait()
        finally:
            ckpt.close()
        staged.commit_config(cfg)
        _check_import_target(run_dir)  # still ours to fill: nothing was put there meanwhile
        storage.publish_folder(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg, sum(v.size for v in jax.tree.leaves(params))


def _check_import_target(run_dir) -> None:
    if storage.check_output(run_dir, "run", reuse=True) and not storage.marker_of(run_dir).get("incomplete"):
        raise OutputError(f"{run_dir} already holds a run directory; import-hf starts a new run: choose a new "
                          "or empty folder")
    storage.check_writable(run_dir, "the run directory")
    check_free(run_dir)  # a training that has just started there


def transformers_generate(*, run_dir=None, hf=None, step=None, prompts: list[str], num_samples: int = 1,
                          max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                          greedy: bool = False, seed: int = 0) -> list[str]:
    """The same sampling through transformers' `pipeline("text-generation")` on the HF folder (a
    run is exported to a temporary folder first): the reference the JAX sampler is compared with."""
    require_torch()
    import transformers  # deferred: heavy (about 1 s), and only this backend needs it

    with tempfile.TemporaryDirectory(prefix="flax_gpt-generate-") as tmp:
        if hf is not None:
            if step is not None:
                raise ConfigError("--step selects a checkpoint of a run directory; it does not apply to --hf")
            folder = resolve_source(str(hf))
            read_hf_folder(folder)  # the same checks as the JAX path: config.json, safetensors only
        else:
            folder, _ = export_run(run_dir, Path(tmp) / "export", step=step)
        vocab = json.loads((Path(folder) / "config.json").read_text()).get("vocab_size", 0)
        tokenizer = folder_tokenizer(Path(folder), vocab).hf()
        transformers.set_seed(seed)
        generator = transformers.pipeline("text-generation", model=str(folder), tokenizer=tokenizer, device="cpu")
        eos = generator.tokenizer.eos_token_id
        greedy = greedy or temperature == 0
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=eos, do_sample=not greedy)
        if not greedy:
            kw.update(temperature=temperature, top_k=top_k, top_p=top_p, num_return_sequences=num_samples)
        out = []
        for prompt in prompts:  # one prompt at a time: no pad-token batching surprises
            got = [d["generated_text"] for d in generator(prompt, **kw)]
            out += got if not greedy else got * num_samples  # greedy samples are all the same
        return out
