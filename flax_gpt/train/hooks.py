"""The training loop's periodic actions: evaluation, checkpoints and the profiler window, each a
hook with its own cadence. `build_hooks` makes the list a `Trainer` runs from the config, in the
order they run after a step; a new periodic action is a class here and a line in `build_hooks`.

A hook sees the run through the loop (`loop.Loop`): its state, checkpointer, metrics writer,
progress bar and last evaluation; `loop.flush()` checks the pending step's metrics first, so no
step is evaluated, saved or traced whose loss was not checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax

from flax_gpt import storage
from flax_gpt.config import Config, profile_range
from flax_gpt.train.evaluate import Evaluator
from flax_gpt.train.loop import Loop
from flax_gpt.train.metric_keys import PERPLEXITY, STEP, VAL_LOSS


class Hook:
    """A periodic action: `run(step, loop)` after each step that `every` divides (0: never),
    except the last one, which gets `at_end(step, loop)`. `before(step, loop)` comes before
    step `step + 1` is dispatched; `close(loop)` always, also when the loop fails or stops."""

    every: int = 0

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def before(self, step: int, loop: Loop) -> None:
        pass

    def run(self, step: int, loop: Loop) -> None:
        pass

    def at_end(self, step: int, loop: Loop) -> None:
        pass

    def close(self, loop: Loop) -> None:
        pass


class Profile(Hook):
    """Traces steps START+1 .. END of `train.profile_steps` "START:END" into RUN_DIR/profile."""

    def __init__(self, window: tuple[int, int]):
        self.first, self.last = window
        self.trace_dir: Path | None = None
        self.tracing = False

    def due(self, step: int, total_steps: int) -> bool:
        return self.tracing and step == self.last

    def before(self, step: int, loop: Loop) -> None:
        if step != self.first:
            return
        loop.flush()
        # Traced into a local folder of its own, put in the run directory when the trace ends,
        # and only once it is the run's: a first step that fails writes nothing there.
        self.trace_dir = Path(tempfile.mkdtemp(prefix=f"{storage.TMP_PREFIX}profile-"))
        jax.profiler.start_trace(str(self.trace_dir))
        self.tracing = True

    def run(self, step: int, loop: Loop) -> None:
        loop.flush()
        jax.profiler.stop_trace()
        self.tracing = False
        loop.run_dir.publish_trace(self.trace_dir)

    def close(self, loop: Loop) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
        if self.trace_dir is not None:
            loop.run_dir.publish_trace(self.trace_dir, keep=loop.committed)


class Evaluate(Hook):
    """Validation loss every `train.eval_every` steps, and after the last step when `final`
    (unless that step was just evaluated); the result is `loop.last_eval`."""

    def __init__(self, every: int, evaluator: Evaluator, val_rows, *, final: bool):
        self.every, self.evaluator, self.val_rows, self.final = every, evaluator, val_rows, final

    def run(self, step: int, loop: Loop) -> None:
        loop.flush()
        loop.last_eval = {STEP: step, **self.evaluator.evaluate(loop.state.params, self.val_rows)}
        loop.writer.write(loop.last_eval)
        loop.bar.write(f"step {step}: val_loss {loop.last_eval[VAL_LOSS]:.4f}  "
                       f"perplexity {loop.last_eval[PERPLEXITY]:.2f}")
        loop.untime()  # the next step's time would include the evaluation

    def at_end(self, step: int, loop: Loop) -> None:
        if self.final and (loop.last_eval is None or loop.last_eval[STEP] != step):
            self.run(step, loop)


class Checkpoint(Hook):
    """A checkpoint every `checkpoint.every` steps, and of the last step (unless already saved)."""

    def __init__(self, every: int):
        self.every = every

    def run(self, step: int, loop: Loop) -> None:
        loop.flush()
        loop.save(step)

    def at_end(self, step: int, loop: Loop) -> None:
        if loop.last_saved != step:
            loop.save(step)


def build_hooks(cfg: Config, evaluator: Evaluator, val_rows, *, final_eval: bool) -> list[Hook]:
    """The hooks `cfg` asks for, in the order they run: the trace ends before the step is
    evaluated, and the evaluation comes before the checkpoint, which records its val_loss."""
    hooks: list[Hook] = []
    if cfg.train.profile_steps:
        hooks.append(Profile(profile_range(cfg.train.profile_steps)))
    if val_rows is not None and val_rows.num_rows > 0:
        hooks.append(Evaluate(cfg.train.eval_every, evaluator, val_rows, final=final_eval))
    hooks.append(Checkpoint(cfg.checkpoint.every))
    return hooks
