"""A run's metrics as series: the train and eval records of `metrics.jsonl`, columns of them, and
the one definition of mean throughput that the summary, the HTML page and the throughput plot share."""

from __future__ import annotations

import math

import numpy as np

from flax_gpt.errors import ConfigError
from flax_gpt.train.metric_keys import LOSS, MFU, STEP, STEP_TIME_S, TOKENS_PER_SEC, VAL_LOSS
from flax_gpt.train.metrics import METRICS_FILE
from flax_gpt.train.run_dir import RunDir

MEAN_TPS_DEFINITION = ("tokens trained in the timed steps of metrics.jsonl ÷ their summed step time (total "
                       "tokens over total time, not a mean of per-step rates); the run's first timed step is "
                       "left out while it still warms up, as training's own summary leaves it out")


def read_series(run: RunDir) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), one per step (the later line wins), sorted by step."""
    if not run.metrics_file.exists():
        raise ConfigError(f"{run.path} has no {METRICS_FILE}; pass the train.run_dir of a run that has trained "
                          f"(`flax-gpt train CONFIG train.run_dir={run.path}`)")
    try:
        records = run.metrics()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train = {int(r[STEP]): r for r in records if LOSS in r}
    evals = {int(r[STEP]): r for r in records if VAL_LOSS in r}
    if not train:
        raise ConfigError(f"{run.metrics_file} has no training records; train at least one step first")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def column(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry `key`; non-finite values become NaN (plot gaps)."""
    rows = [(r[STEP], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    steps = np.array([s for s, _ in rows], dtype=np.int64)
    values = np.array([v for _, v in rows], dtype=np.float64)
    return steps, np.where(np.isfinite(values), values, np.nan)


def _is_timed(r: dict) -> bool:
    t, tps = r.get(STEP_TIME_S), r.get(TOKENS_PER_SEC)
    return isinstance(t, (int, float)) and isinstance(tps, (int, float)) and math.isfinite(t * tps) and t > 0


def warmup_step(train: list[dict]) -> int | None:
    """The run's first timed step when metrics.jsonl shows it is one: the step right after the
    first (untimed, compiling) step. With `train.log_every` > 1 that step is not logged, and the
    first logged timed step is an ordinary one: None."""
    timed = [r[STEP] for r in train if _is_timed(r)]
    if len(timed) < 2:  # a lone timed step is the only figure there is
        return None
    return timed[0] if timed[0] == train[0][STEP] + 1 else None


def mean_tokens_per_sec(train: list[dict]) -> float | None:
    """Mean training throughput over all devices, as MEAN_TPS_DEFINITION says; None when no step
    was timed. `tokens_per_sec * step_time_s` is the tokens of that step, so no config is needed."""
    skip = warmup_step(train)
    timed = [r for r in train if _is_timed(r) and r[STEP] != skip]
    total_time = math.fsum(r[STEP_TIME_S] for r in timed)
    if total_time <= 0:
        return None
    return math.fsum(r[TOKENS_PER_SEC] * r[STEP_TIME_S] for r in timed) / total_time


def mean_mfu(train: list[dict]) -> float | None:
    """MFU at the mean throughput: MFU is proportional to tokens/s (same model, devices, peak), so
    the mean MFU follows from the one mean tokens/s rather than being a second kind of average."""
    tps = mean_tokens_per_sec(train)
    ratio = next((r[MFU] / r[TOKENS_PER_SEC] for r in train if _is_timed(r) and
                  isinstance(r.get(MFU), (int, float)) and r[TOKENS_PER_SEC] > 0), None)
    return None if tps is None or ratio is None else tps * ratio
