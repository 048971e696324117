"""One evaluation, used by the training loop, the `eval` verb and the Python API: the mean
next-token loss over every target token of a set of rows, exactly once, and its perplexity.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from flax_gpt.config import ModelConfig
from flax_gpt.data.loader import EvalLoader
from flax_gpt.errors import DataError
from flax_gpt.model.family import abstract_params, model
from flax_gpt.sharding import batch_sharding, on_mesh, param_shardings, replicated
from flax_gpt.train.metric_keys import EVAL_TOKENS, PERPLEXITY, VAL_LOSS
from flax_gpt.train.step import eval_step


class Evaluator:
    """Loss and perplexity of parameters placed on `mesh`, over rows of a split (or any `TokenRows`)."""

    def __init__(self, model_cfg: ModelConfig, mesh: Mesh, *, batch_size: int, document_mask: bool,
                 packing: str | None = None):
        self.mesh, self.batch_size = mesh, int(batch_size)
        self.document_mask, self.packing = document_mask, packing
        self.batch_sh = batch_sharding(mesh)
        self._param_sh = param_shardings(mesh, abstract_params(model_cfg, boxed=True))
        self._model, self._fns = model(model_cfg), {}

    def eval_fn(self, eos_id: int):
        """The jitted eval step for a document separator (compiled once per id)."""
        if eos_id not in self._fns:
            fn = functools.partial(eval_step, model=self._model, document_mask=self.document_mask, eos_id=eos_id)
            self._fns[eos_id] = jax.jit(on_mesh(fn, self.mesh), in_shardings=(self._param_sh, self.batch_sh),
                                        out_shardings=replicated(self.mesh))
        return self._fns[eos_id]

    def evaluate(self, params, rows, *, progress: bool = False) -> dict:
        """{VAL_LOSS, PERPLEXITY, EVAL_TOKENS} (`metric_keys`); a DataError when `rows` hold no target token.
        `progress`: a bar over the batches on stderr (the `eval` verb; the training loop has its own)."""
        if rows.num_rows == 0:  # said before any progress bar opens
            raise self._no_tokens(rows)
        loader = EvalLoader(rows, batch=self.batch_size, document_mask=self.document_mask,
                            packing=self.packing, sharding=self.batch_sh)
        loss_sum, tokens = 0.0, 0.0
        step = self.eval_fn(rows.eos_id)
        for batch in tqdm(loader, total=len(loader), desc=f"eval ({rows.num_rows:,} rows of {rows.seq_len})",
                          unit="batch", disable=not progress, file=sys.stderr):
            out = jax.device_get(step(params, batch))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        if tokens == 0:
            raise self._no_tokens(rows)
        val_loss = loss_sum / tokens
        return {VAL_LOSS: val_loss, PERPLEXITY: math.exp(min(val_loss, 700.0)), EVAL_TOKENS: int(tokens)}

    @staticmethod
    def _no_tokens(rows) -> DataError:
        return DataError(f"split {rows.split!r} in {rows.shards_dir} has no tokens to evaluate; "
                         "raise data.val_fraction or evaluate on more text")
