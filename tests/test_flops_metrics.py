"""FLOPs accounting, the peak table, and the metrics writers (CPU, fast, offline)."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from flax_gpt.config import ModelConfig
from flax_gpt.model.flops import flops_per_token, mfu, param_count, peak_flops
from flax_gpt.presets import MODEL_PRESETS
from flax_gpt.train.metrics import ProgressBar, Throughput
from flax_gpt.train.run_dir import RunDir


def _preset(name: str, **changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(preset=name, **MODEL_PRESETS[name]), **changes)


def _hf_model(cfg: ModelConfig):
    """transformers' GPT-2 with the same shapes, on the meta device (no memory, no download)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner or None,
    )
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(hf_cfg)


# ------------------------------------------------------------------------------------ flops


@pytest.mark.parametrize(
    "cfg",
    [_preset("gpt2"), _preset("tiny", n_inner=200, n_layer=3)],
    ids=["gpt2", "tiny-custom-mlp"],
)
@pytest.mark.parametrize("seq_len", [128, 1024])
def test_flops_per_token_matches_count_from_transformers_model(cfg, seq_len):
    model = _hf_model(cfg)
    # Documented formula: 6*N + 12*L*T*D (no causal halving), N = every parameter except the
    # position embedding; the tied wte appears once in parameters() and stands for the LM head.
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    expected = 6 * n + 12 * cfg.n_layer * seq_len * cfg.n_embd
    assert flops_per_token(cfg, seq_len) == expected
    assert param_count(cfg) == model.num_parameters()


def test_vocab_padding_adds_parameters_but_not_model_flops():
    cfg = _preset("gpt2")
    padded = dataclasses.replace(cfg, pad_vocab_to=128)  # 50257 -> 50304 rows
    assert flops_per_token(padded, 1024) == flops_per_token(cfg, 1024)
    assert param_count(padded) - param_count(cfg) == (50304 - 50257) * cfg.n_embd


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),  # v5e, must not fall through to v5p's "TPU v5"
        ("TPU v5", 459e12),  # v5p
        ("TPU v6 lite", 918e12),
        ("TPU v3", 123e12 / 2),  # one jax device per TensorCore
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", None),  # "l4" must match a whole word only
        ("cpu", None),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_flops_lookup(kind, expected):
    assert peak_flops(kind) == expected


def test_mfu_divides_achieved_model_flops_by_peak():
    fpt = flops_per_token(_preset("gpt2"), 1024)
    assert mfu(100_000.0, fpt, "TPU v4") == pytest.approx(100_000.0 * fpt / 275e12)
    assert mfu(100_000.0, fpt, "cpu") is None


def test_throughput_summary():
    fpt = 1e9
    tp = Throughput(tokens_per_step=8192, n_devices=4, flops_per_token=fpt, device_kind="TPU v4", window=3)
    for t in (9.0, 0.5, 1.0, 1.5):  # window of 3 drops the first (compile) time
        tp.update(t)
    s = tp.summary()
    assert s["step_time_s"] == pytest.approx(1.0)
    assert s["tokens_per_sec"] == pytest.approx(8192 * 3 / 3.0)
    assert s["tokens_per_sec_per_device"] == pytest.approx(8192 / 4)
    assert s["mfu"] == pytest.approx(8192 / 4 * fpt / 275e12)
    cpu = Throughput(tokens_per_step=10, n_devices=1, flops_per_token=fpt, device_kind="cpu")
    assert cpu.summary([2.0])["tokens_per_sec"] == pytest.approx(5.0)
    assert cpu.summary([2.0])["mfu"] is None
    assert cpu.summary() == {}


# ------------------------------------------------------------------------ TensorBoard reader
# Our own TFRecord reader (length, masked CRC32C of length, payload, masked CRC32C of payload),
# independent of tensorboardX's writer code; only the Event protobuf schema is shared.


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboardX.proto import event_pb2

    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {tb_dir}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        buf = f.read_bytes()
        pos = 0
        while pos < len(buf):
            header = buf[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (len_crc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
            assert len_crc == _masked(_crc32c(header)), "corrupt record length"
            payload = buf[pos + 12 : pos + 12 + length]
            (data_crc,) = struct.unpack("<I", buf[pos + 12 + length : pos + 16 + length])
            assert data_crc == _masked(_crc32c(payload)), "corrupt record payload"
            pos += 16 + length
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


# ---------------------------------------------------------------------------- MetricsWriter


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    records = [
        {"step": np.int64(1), "loss": np.float32(3.25), "lr": 5e-4, "tokens_per_sec": np.float64(1234.5)},
        {"step": 2, "loss": np.float32(3.0), "lr": np.float32(4.5e-4), "tokens_per_sec": 1300},
        {"step": 2, "val_loss": np.float64(3.125), "val_ppl": 22.76},
    ]
    with RunDir(tmp_path).metrics_writer(enabled=True) as w:
        for r in records:
            w.write(r)
        # flushed per write: readable before close
        assert len(RunDir(tmp_path).metrics()) == 3

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == RunDir(tmp_path).metrics()
    got = RunDir(tmp_path).metrics()
    assert got == [
        {"step": 1, "loss": 3.25, "lr": 5e-4, "tokens_per_sec": 1234.5},
        {"step": 2, "loss": 3.0, "lr": float(np.float32(4.5e-4)), "tokens_per_sec": 1300},
        {"step": 2, "val_loss": 3.125, "val_ppl": 22.76},
    ]
    assert type(got[0]["step"]) is int and type(got[0]["loss"]) is float

    scalars = _read_scalars(tmp_path / "tb")
    assert set(scalars) == {
        "train/loss", "train/lr", "train/tokens_per_sec", "eval/val_loss", "eval/val_ppl",
    }
    assert scalars["train/loss"] == [(1, 3.25), (2, 3.0)]
    assert scalars["train/tokens_per_sec"] == [(1, 1234.5), (2, 1300.0)]
    assert scalars["train/lr"][0] == (1, pytest.approx(5e-4, rel=1e-6))
    assert scalars["eval/val_loss"] == [(2, 3.125)]
    assert scalars["eval/val_ppl"] == [(2, pytest.approx(22.76, rel=1e-6))]


def test_metrics_writer_appends_on_resume(tmp_path):
    with RunDir(tmp_path).metrics_writer(enabled=True) as w:
        w.write({"step": 1, "loss": 2.0})
    with RunDir(tmp_path).metrics_writer(enabled=True) as w:
        w.write({"step": 2, "loss": 1.5})
    assert [r["step"] for r in RunDir(tmp_path).metrics()] == [1, 2]


def test_metrics_writer_requires_step(tmp_path):
    with RunDir(tmp_path).metrics_writer(enabled=True) as w, pytest.raises(ValueError, match="step"):
        w.write({"loss": 1.0})


def test_disabled_writer_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    w = RunDir(run_dir).metrics_writer(enabled=False)
    w.write({"step": 1, "loss": 2.0})
    w.close()
    assert not run_dir.exists()
    assert RunDir(run_dir).metrics() == []


def test_metrics_skips_line_cut_short_by_crash(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert RunDir(tmp_path).metrics() == [{"step": 1, "loss": 2.0}]


def test_progress_bar_shows_loss_and_throughput_in_a_pipe():
    out = io.StringIO()  # not a TTY
    with ProgressBar(10, initial_step=4, file=out) as bar:
        for step in range(5, 11):
            bar.update(step, loss=2.5, tokens_per_sec=12345.0)
    text = out.getvalue()
    assert "10/10" in text
    assert "loss=2.5000" in text and "12,345" in text

    quiet = io.StringIO()
    with ProgressBar(10, file=quiet, disable=True) as bar:
        bar.update(3, loss=1.0)
    assert quiet.getvalue() == ""
