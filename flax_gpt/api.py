"""The notebook API: the CLI's verbs as Python calls, with the same configs and the same errors.

    from flax_gpt import api

    cfg = api.config("configs/quickstart.yaml", "train.run_dir=runs/notebook", "train.export_dir=")
    api.prepare(cfg)                                  # shards + manifest.json (reused when they match)
    records = []
    lm = api.train(cfg, on_metrics=records.append)    # a progress bar; each metrics.jsonl record, live
    lm.result                                         # what `flax-gpt train` prints
    lm.evaluate()                                     # {"step", "val_loss", "perplexity", "tokens", ...}
    lm.generate("clustering", max_new_tokens=40, top_p=0.95)
    lm.export("exports/notebook")                     # a transformers folder, checked on reload
    lm.push_to_hub("you/flax-gpt-notebook")           # that folder, to the Hugging Face Hub
    lm.plots()["loss"].savefig("loss.png")            # the report's plots as matplotlib Figures

`LM.from_run(RUN_DIR)`, `LM.from_hf(FOLDER_OR_HUB_ID)` and `api.import_hf(SRC, RUN_DIR)` load what
is already there. A config is a YAML path or a `Config`, plus `section.key=value` overrides, exactly
as `flax-gpt VERB CONFIG k=v ...` takes them. Each call does what its CLI verb does, through the same
`pipeline`, export and report functions, and raises the `flax_gpt.errors.UserError` that the CLI
prints as its one `error:` line. Interrupting the kernel during `train` finishes the step, writes a
checkpoint and returns (the same call resumes), as SIGTERM does for `flax-gpt train`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from flax_gpt import pipeline
from flax_gpt.config import Config
from flax_gpt.config_files import build_config, load_config
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.errors import ConfigError
from flax_gpt.export.hf_folder import export_run
from flax_gpt.export.hub import push_to_hub
from flax_gpt.generate import LoadedModel, load_model
from flax_gpt.report.plots import corpus_figure, loss_figure, lr_figure, perplexity_figure, throughput_figure
from flax_gpt.report.series import read_series
from flax_gpt.train.metric_keys import STEP
from flax_gpt.train.run_dir import RunDir

ConfigLike = Config | str | Path | None


def config(source: ConfigLike = None, *overrides: str) -> Config:
    """The config `flax-gpt VERB SOURCE OVERRIDES...` runs with: a YAML file (None: the defaults) or
    a `Config`, then `section.key=value` overrides, checked as the CLI checks them."""
    if isinstance(source, Config):  # its dict reloads to the same values, as RUN_DIR/config.yaml does
        return build_config(source.to_dict(), overrides)
    return load_config(None if source is None else str(source), overrides)


def prepare(cfg: ConfigLike, *overrides: str, overwrite: bool = False, verify: bool = False) -> dict:
    """`flax-gpt prepare`: `data.source` tokenized into packed shards in `data.shards_dir`; returns
    the manifest (`flax_gpt.data.stats.describe_stats(manifest)` is the summary the CLI prints)."""
    return prepare_shards(config(cfg, *overrides).data, overwrite=overwrite, verify=verify)


def train(cfg: ConfigLike, *overrides: str, overwrite_data: bool = False, overwrite_export: bool = False,
          on_metrics: Callable[[dict], None] | None = None) -> LM:
    """`flax-gpt train` (resumes a run directory's latest checkpoint): returns the trained model,
    with `.result` the dict the CLI prints. `on_metrics` gets each record as it is written to
    `metrics.jsonl` (train lines with `loss`, eval lines with `val_loss`); `train.progress=false`
    turns the progress bar off."""
    cfg = config(cfg, *overrides)
    result, final = pipeline.train(cfg, overwrite_data=overwrite_data, overwrite_export=overwrite_export,
                                   on_record=on_metrics)
    return LM(pipeline.trained_model(cfg, final), result=result, folder=result.get("export_dir"))


def import_hf(src: str, run_dir: str | Path) -> LM:
    """`flax-gpt import-hf`: an HF folder or Hub id as a new run directory's step-0 checkpoint."""
    pipeline.import_hf(src, run_dir)
    return LM.from_run(run_dir)


class LM:
    """A model to evaluate, sample, export, push and plot: a run's checkpoint or an HF folder."""

    def __init__(self, model: LoadedModel, *, result: dict | None = None, folder: str | Path | None = None):
        self.model = model
        self.params, self.cfg, self.tokenizer = model.params, model.cfg, model.tokenizer
        self.run_dir, self.step = model.run_dir, model.step
        self.result = result  # what training returned (api.train only)
        # The HF folder push_to_hub uploads: from_hf's own, else the latest export of this run.
        self.folder = folder if folder is not None else model.folder

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int | str | None = None) -> LM:
        """A run directory's checkpoint: `step` N, "latest" (default) or "best"."""
        return cls(load_model(run_dir=run_dir, step=step))

    @classmethod
    def from_hf(cls, folder: str | Path, dtype: str = "float32") -> LM:
        """An HF GPT-2 folder (e.g. our export) or a Hub id."""
        return cls(load_model(hf=str(folder), dtype=dtype))

    def generate(self, prompts: list[str] | str, *, max_new_tokens: int = 64, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 seed: int = 0) -> list[str]:
        """`flax-gpt generate`: `num_samples` texts per prompt (prompt + continuation), prompt-major."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.model.generate(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed)

    def evaluate(self, data=None, *, text_column: str | None = None, template: str | None = None,
                 seq_len: int | None = None) -> dict:
        """`flax-gpt eval`: loss and perplexity over the run's validation split, or over `data` (any
        source `data.source` accepts, or a prepared shards folder); an HF model needs `data`."""
        model = {"hf": str(self.model.folder)} if self.run_dir is None else \
            {"run_dir": self.run_dir, "step": self.step}
        data = os.fspath(data) if isinstance(data, os.PathLike) else data  # a source is text, as on the CLI
        return pipeline.evaluate(**model, data=data, text_column=text_column, template=template, seq_len=seq_len,
                                 say=print)

    def export(self, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
        """`flax-gpt export`: this checkpoint as a transformers folder, reloaded and compared first."""
        if self.run_dir is None:
            raise ConfigError("export() writes a run's checkpoint; this model is already the HF folder "
                              f"{self.model.folder}")
        self.folder = export_run(self.run_dir, out, step=self.step, dtype=dtype, overwrite=overwrite)[0]
        return self.folder

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                    token: str | None = None, endpoint: str | None = None) -> str:
        """`flax-gpt export --push-to-hub`: upload this model's HF folder; returns the repo's URL.
        Token: `token`, else HF_TOKEN, else `hf auth login`'s."""
        if self.folder is None:
            raise ConfigError("push_to_hub() uploads an export; call export(FOLDER) first, or train with "
                              "train.export_dir set")
        return push_to_hub(self.folder, repo_id, private=private, revision=revision, token=token, endpoint=endpoint)

    def plots(self) -> dict[str, Figure]:
        """The report's plots of this run as Figures, named as `flax-gpt report` names its PNGs:
        "loss", "perplexity", "learning_rate", "throughput", and "corpus_lengths" when the run's
        shards are here. Drawn without pyplot, so the caller's backend is left alone: `fig.savefig(path)`,
        or in Jupyter after `%matplotlib inline`, a cell whose value is a figure shows it."""
        if self.run_dir is None:
            raise ConfigError("plots() draws a run's metrics; load the run with LM.from_run(RUN_DIR)")
        run = RunDir(self.run_dir)
        train, evals = read_series(run)
        figures = {"loss": loss_figure(train, evals), "perplexity": perplexity_figure(evals, train[-1][STEP]),
                   "learning_rate": lr_figure(train), "throughput": throughput_figure(train)}
        manifest = run.manifest(run.config())
        if manifest is not None:
            figures["corpus_lengths"] = corpus_figure(manifest)
        return figures
