"""A short Python API for notebooks: load a run or an HF folder, generate, evaluate, export.

    from flax_gpt.api import LM
    lm = LM.from_run("runs/quickstart")            # or LM.from_hf("runs/quickstart/hf")
    lm.generate(["clustering"], max_new_tokens=40, top_p=0.95)
    lm.evaluate()                                  # runs only: {"step", "val_loss", "perplexity", "tokens"}
    lm.export("out/hf")                            # runs only
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax_gpt.config import ConfigError, ModelConfig


@dataclasses.dataclass
class LM:
    params: dict
    cfg: ModelConfig
    tokenizer: object
    run_dir: Path | None = None
    step: int | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int | str | None = None) -> "LM":
        from flax_gpt.data import load_tokenizer
        from flax_gpt.run import load_params

        cfg, params, chosen, _ = load_params(run_dir, step)
        return cls(params, cfg.model, load_tokenizer(cfg.data.tokenizer), Path(run_dir), chosen)

    @classmethod
    def from_hf(cls, folder: str | Path, dtype: str = "float32") -> "LM":
        """An HF GPT-2 folder (e.g. our export) or a Hub id."""
        from flax_gpt.data import load_tokenizer
        from flax_gpt.hf_io import load_hf, resolve_source
        from flax_gpt.model import abstract_params

        path = resolve_source(str(folder))
        cfg, params = load_hf(str(path), abstract_params, dtype=dtype)
        has_tok = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
        return cls(params, cfg, load_tokenizer(str(path) if has_tok else "gpt2"))

    def generate(self, prompts: list[str] | str, *, max_new_tokens: int = 64, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 seed: int = 0) -> list[str]:
        from flax_gpt.generate import generate_text

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate_text(self.params, self.cfg, self.tokenizer, prompts, num_samples=num_samples,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, greedy=greedy, seed=seed)

    def evaluate(self) -> dict:
        from flax_gpt.pipeline import evaluate_run

        if self.run_dir is None:
            raise ConfigError("evaluate() needs a run directory (LM.from_run) for its validation split")
        return evaluate_run(self.run_dir, step=self.step)

    def export(self, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
        from flax_gpt.pipeline import export_run

        if self.run_dir is None:
            raise ConfigError("export() needs a run directory (LM.from_run)")
        return export_run(self.run_dir, out, step=self.step, dtype=dtype, overwrite=overwrite)[0]
