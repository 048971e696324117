"""Training metrics: JSONL + TensorBoard (+ optional W&B) writers, a progress bar, and throughput.

On-disk layout (**contract**, read by the report and the tests):
- `RUN_DIR/metrics.jsonl`: one JSON object per line, each with an integer `step`; train lines
  carry e.g. `loss`, `lr`, `tokens_per_sec`; eval lines carry `val_loss` (every key, its meaning
  and unit: `metric_keys`). Appended to, so a resumed run continues the same file (a step may then
  appear twice; the later line wins).
- `RUN_DIR/tb/`: TensorBoard event files, one scalar per numeric key at `step`, tagged
  `train/<key>`, or `eval/<key>` for lines that contain `val_loss`.
- With `train.wandb_project` set, every metrics.jsonl record also goes to a Weights & Biases run
  (the same keys, `step` its x-axis) that records the resolved config; `RUN_DIR/wandb_id` names
  that run, so a resumed training continues it.

Only process 0 writes (`enabled=jax.process_index() == 0`); elsewhere every call is a no-op.
This module never imports jax: device arrays are converted with `.item()`.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm  # in Jupyter a notebook widget, elsewhere the text bar

from flax_gpt import storage
from flax_gpt.config import Config, TrainConfig
from flax_gpt.errors import ConfigError
from flax_gpt.model import flops
from flax_gpt.train.metric_keys import (
    MFU,
    MODEL_FLOPS_PER_SEC_PER_DEVICE,
    STEP,
    STEP_TIME_S,
    TOKENS_PER_SEC,
    TOKENS_PER_SEC_PER_DEVICE,
    VAL_LOSS,
)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id"


def _plain(key: str, value: Any) -> Any:
    """A JSON-ready python value: numpy/jax scalars become int/float/bool."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(key, v) for v in value]
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy / jax scalar or 1-array
        return _plain(key, value.item())
    raise TypeError(f"metric {key!r} has a value of type {type(value).__name__} that is not a scalar")


def check_wandb(train: TrainConfig) -> None:
    """Before training: W&B logging (`train.wandb_project`) needs the optional wandb package."""
    if train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={train.wandb_project} needs the wandb package: "
                          'pip install -e ".[wandb]" (or set train.wandb_project= to train without W&B)')


class _WandbRun:
    """The W&B mirror of metrics.jsonl: one W&B run per run directory, its id kept in
    `RUN_DIR/wandb_id` so a resumed training logs on into the same run. `WANDB_MODE`, `WANDB_DIR`
    and the other WANDB_* variables work as usual."""

    def __init__(self, config: Config, run_dir) -> None:
        import wandb  # deferred: an optional extra, loaded only when train.wandb_project is set

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B ids: letters, digits, - and _
            storage.write_atomic(id_file, run_id + "\n")
        t = config.train
        # A resume may change settings that only affect how the run goes (train.steps, eval_every...).
        self.run = wandb.init(project=t.wandb_project, entity=t.wandb_entity or None,
                              name=t.wandb_run_name or run_dir.name, id=run_id, resume="allow",
                              config=config.to_dict(), allow_val_change=True)
        # Our step is the x-axis, not W&B's own row counter: a run resumed from an earlier checkpoint
        # logs steps again (as metrics.jsonl does) instead of W&B dropping them as out of order.
        self.run.define_metric("*", step_metric=STEP)

    def log(self, line: dict[str, Any]) -> None:
        self.run.log(line)

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Appends metric records to `RUN_DIR/metrics.jsonl` and TensorBoard scalars to `RUN_DIR/tb`
    (and to W&B when `config.train.wandb_project` is set; `config` is the run's resolved config).

    `purge_step`: when resuming from a checkpoint at that step, TensorBoard hides the events the
    previous run wrote at or after it, so the curves don't fold back on themselves.

    A bucket run directory (gs://) cannot be appended to: the files are written to a local staging
    folder and uploaded whole by `sync()` (with each checkpoint, at most `sync_every_s` apart, and
    on close).
    """

    def __init__(self, run_dir, *, enabled: bool, purge_step: int | None = None, sync_every_s: float = 30.0,
                 on_record=None, config: Config | None = None):
        self.enabled, self.purge_step, self.sync_every_s = enabled, purge_step, sync_every_s
        self.config = config
        if config is not None:
            check_wandb(config.train)
        self.on_record = on_record  # called with each record as written: a notebook's live plot
        self.run_dir = storage.location(run_dir)
        self.remote = storage.is_remote(run_dir)
        self._local: Path | None = None
        self._file = None
        self._tb = None
        self._wandb: _WandbRun | None = None
        self._synced = time.monotonic()

    def _open(self) -> None:
        """Files are created by the first record, so a run that never trains a step writes nothing."""
        if self.remote:
            self._local = Path(tempfile.mkdtemp(prefix="flax_gpt-metrics-"))
            if (self.run_dir / METRICS_FILE).exists():  # resuming: keep the history
                (self._local / METRICS_FILE).write_bytes((self.run_dir / METRICS_FILE).read_bytes())
        else:
            self._local = Path(str(self.run_dir))
            self._local.mkdir(parents=True, exist_ok=True)
        self._file = (self._local / METRICS_FILE).open("a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # deferred: heavy (protobuf), only the writing host needs it

        self._tb = SummaryWriter(logdir=str(self._local / TB_DIR), purge_step=self.purge_step)
        if self.config is not None and self.config.train.wandb_project:
            self._wandb = _WandbRun(self.config, self.run_dir)

    def sync(self) -> None:
        """Upload the staged files to a bucket run directory (nothing to do for a local one)."""
        if not (self.remote and self._local is not None):
            return
        self._file.flush()
        self._tb.flush()
        storage.upload_folder(self._local, self.run_dir)
        self._synced = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (must contain `step`); values may be numpy or jax scalars."""
        if not self.enabled:
            return
        if STEP not in record:
            raise ValueError(f"metrics record has no {STEP!r} (keys: {sorted(record)})")
        if self._file is None:
            self._open()
        line = {k: _plain(k, v) for k, v in record.items()}
        step = int(line[STEP])
        line[STEP] = step
        # NaN/inf are written as Python's json writes them (NaN, Infinity): a diverged loss stays
        # visible, and `RunDir.metrics` reads it back.
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self.on_record is not None:
            self.on_record(dict(line))
        prefix = "eval" if VAL_LOSS in line else "train"
        for key, value in line.items():
            if key == STEP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._tb.add_scalar(f"{prefix}/{key}", float(value), global_step=step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(line))
        if self.remote and time.monotonic() - self._synced > self.sync_every_s:
            self.sync()

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self.remote and self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


class ProgressBar:
    """tqdm bar over training steps showing loss, tokens/s and the ETA.

    On a terminal or in a notebook it refreshes ~10x a second; in a pipe or log file it stays
    visible but redraws at most every `pipe_interval_s` seconds so logs don't fill with
    carriage-return updates.
    `disable=True` (e.g. `train.progress=false`, or not process 0) turns it off.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        disable: bool = False,
        file: Any = None,
        pipe_interval_s: float = 30.0,
    ):
        file = file if file is not None else sys.stderr
        # A Jupyter kernel redraws the bar in place like a terminal does, though its stderr is no tty.
        is_tty = bool(getattr(file, "isatty", lambda: False)()) or "ipykernel" in sys.modules
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            file=file,
            disable=disable,
            dynamic_ncols=is_tty,
            mininterval=0.1 if is_tty else pipe_interval_s,
            smoothing=0.1,
        )

    def update(self, step: int, *, loss: float | None = None, tokens_per_sec: float | None = None) -> None:
        """Move the bar to `step` (absolute, not a delta) and show the latest metrics."""
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if tokens_per_sec is not None:
            postfix["tok/s"] = f"{float(tokens_per_sec):,.0f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """Print a line on stdout without breaking the bar (phases, eval results), flushed so a
        pipe or log file sees it when it is said."""
        self._bar.write(text)
        sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


class Throughput:
    """Throughput and MFU from per-step wall times over a sliding window of recent steps.

    `tokens_per_step` is global (batch_size * seq_len over all devices); `n_devices` is the total
    device count, so per-device figures are what MFU compares with one device's peak. Leave the
    first step (compilation) out of `update`.
    """

    def __init__(
        self,
        *,
        tokens_per_step: int,
        n_devices: int,
        flops_per_token: float,
        device_kind: str,
        window: int = 20,
    ):
        if tokens_per_step <= 0 or n_devices <= 0:
            raise ValueError("tokens_per_step and n_devices must be positive")
        self.tokens_per_step = tokens_per_step
        self.n_devices = n_devices
        self.flops_per_token = flops_per_token
        self.device_kind = device_kind
        self._times: collections.deque[float] = collections.deque(maxlen=window)

    def update(self, step_time_s: float) -> None:
        self._times.append(float(step_time_s))

    def summary(self, step_times: Iterable[float] | None = None) -> dict[str, float | None]:
        """{step_time_s, tokens_per_sec, tokens_per_sec_per_device, model_flops_per_sec_per_device,
        mfu} over `step_times` (default: the window); {} when there are no times yet.

        Rates are total tokens over total time (not a mean of per-step rates), so one slow step
        weighs as much as the time it took. `mfu` is None on devices without a known peak.
        """
        times = list(self._times if step_times is None else step_times)
        total = math.fsum(times)
        if not times or total <= 0:
            return {}
        tps = self.tokens_per_step * len(times) / total
        per_device = tps / self.n_devices
        return {
            STEP_TIME_S: total / len(times),
            TOKENS_PER_SEC: tps,
            TOKENS_PER_SEC_PER_DEVICE: per_device,
            MODEL_FLOPS_PER_SEC_PER_DEVICE: per_device * self.flops_per_token,
            MFU: flops.mfu(per_device, self.flops_per_token, self.device_kind),
        }
