"""A short Python API for notebooks: load a run or an HF folder, generate, evaluate, export.

    from flax_gpt.api import LM
    lm = LM.from_run("runs/quickstart")            # or LM.from_hf("exports/quickstart")
    lm.generate(["clustering"], max_new_tokens=40, top_p=0.95)
    lm.evaluate()                                  # runs only: {"step", "val_loss", "perplexity", "tokens"}
    lm.export("exports/quickstart-copy")           # runs only
"""

from __future__ import annotations

from pathlib import Path

from flax_gpt import pipeline
from flax_gpt.errors import ConfigError
from flax_gpt.export.hf_folder import export_run
from flax_gpt.generate import LoadedModel, load_model


class LM:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.params, self.cfg, self.tokenizer = model.params, model.cfg, model.tokenizer
        self.run_dir, self.step = model.run_dir, model.step

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int | str | None = None) -> "LM":
        return cls(load_model(run_dir=run_dir, step=step))

    @classmethod
    def from_hf(cls, folder: str | Path, dtype: str = "float32") -> "LM":
        """An HF GPT-2 folder (e.g. our export) or a Hub id."""
        return cls(load_model(hf=str(folder), dtype=dtype))

    def generate(self, prompts: list[str] | str, *, max_new_tokens: int = 64, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 seed: int = 0) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.model.generate(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed)

    def evaluate(self) -> dict:
        if self.run_dir is None:
            raise ConfigError("evaluate() needs a run directory (LM.from_run) for its validation split")
        return pipeline.evaluate(self.run_dir, step=self.step)

    def export(self, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
        if self.run_dir is None:
            raise ConfigError("export() needs a run directory (LM.from_run)")
        return export_run(self.run_dir, out, step=self.step, dtype=dtype, overwrite=overwrite)[0]
