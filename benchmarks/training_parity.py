"""Training parity over a whole run: `flax-gpt train` against plain PyTorch + transformers.

    python benchmarks/training_parity.py data                        # year-split CSVs + shards (once)
    python benchmarks/training_parity.py parity --variant default    # | keras | accum4 | docmask
    python benchmarks/training_parity.py lockstep --variant default  # same, resynchronised every step
    (both take --steps N, default 300, and --every N, default 25; results are written as
    training_parity_free_<variant>_s<seed>.json and training_parity_lockstep_<variant>_s<seed>.json)
    python benchmarks/training_parity.py control                     # torch sdpa vs torch eager
    python benchmarks/training_parity.py stats --side flax --seed 0  # | --side torch [--init hf|flax]
    python benchmarks/training_parity.py summary                     # table of everything measured

(`--corpus /path/to/shared/data/arxiv` when the corpus is not at ../shared/data/arxiv.)

`parity`: one set of initial weights (a fresh transformers GPT2LMHeadModel, saved as safetensors)
is trained twice for `--steps` steps: by flax_gpt's own CLI (`python -m flax_gpt.cli train`, with
`model.init_from=` that folder, so the real loop, loader, checkpoints and schedule run), and by
PyTorch on the *identical* batches: the torch side reads `TrainLoader(...).local_batch(step)` of
the same shards and seed, and computes its loss as sum(nll * loss_mask) / sum(loss_mask) from the
logits (so the row-end masking is the loader's, not `labels=`'s). Its optimizer is written
independently of flax_gpt: torch.optim.AdamW with two groups (decay: every tensor with ndim >= 2,
i.e. Conv1D weights and, when optim.decay_embeddings, wte/wpe; no decay: biases and LayerNorms),
global-norm clipping before the step (norm summed in float64; `--torch-clip native` uses
torch.nn.utils.clip_grad_norm_ as is), and the learning rate of update k (k = 0, 1, ...)
taken from the documented formula in float64 (linear warmup from 0 at k=0, then Keras'
ExponentialDecay on k - warmup_steps); flax_gpt's logged lr of the same update is checked against
it. Grad accumulation: the global batch is cut into consecutive micro-batches, each contributing
sum(nll*mask) / (mask sum of the whole global batch). Document masking: the loader ships only inputs,
targets and loss_mask to the devices and flax_gpt derives positions and segment ids there
(`flax_gpt.train.step.document_positions`); the torch side takes them from the same function
applied to the same inputs and the shards' EOS id (`doc_positions`, checked against the host
loader's `make_batch` on every batch), and passes a 4-D boolean attention mask (causal and same
segment id) and position_ids = those positions.
Recorded: both losses and grad norms every step, and the relative parameter difference every
`--every` steps (flax_gpt checkpoints written by its trainer vs the torch model at that step).

`lockstep`: the same comparison with the torch side reset to flax_gpt's state (weights, AdamW
moments, update count) before every update, so each update is compared from identical states:
the one-step error over the whole run, which a free run cannot show once a loss spike has
amplified float32 rounding (see `control`: two torch runs that differ only in the attention
kernel part just as fast).

`stats`: from-scratch training on real text with each side's own initialisation (flax_gpt:
`train.seed`; transformers: `torch.manual_seed`), the same recipe and the same data order
(TrainLoader with seed = the seed), judged by ONE evaluation function (`heldout_loss`: torch
forward of the HF-layout weights, mean NLL over the loader's loss mask) on abstracts of another
year than the training ones (train: 2025 listings, held-out: 2026 listings).

Corpus: the shared ML arXiv abstracts (`--corpus`, default ../shared/data/arxiv beside the
repository). Year subsets, shards, initial weights and flax_gpt run directories are written under
`--work` (default: a folder in the system's temporary directory; never inside the repository).
Results: `training_parity_*.json` in `--out` (default benchmarks/results), each naming the machine
(platform, CPU count, load average). The short CI version is tests/test_training_parity.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "arxiv"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "flax_gpt_training_parity"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
PREFIX = "training_parity_"
TEMPLATE = "{title}\n{abstract}"

# The recipe of the report: 2 layers, 128 wide, fp32, no dropout, AdamW + warmup + exponential
# decay, clip 1.0, batch 16 x 128, 300 steps.
MODEL = dict(n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=50257)
# Parity runs: weight decay 0.1 (not the quickstart's 0.01) so a wrong decay mask is visible.
RECIPE = dict(learning_rate=3e-3, warmup_steps=20, decay_steps=100, decay_rate=0.8, weight_decay=0.1,
              decay_embeddings=True, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
# The statistical check: configs/quickstart.yaml's optimizer (the report's model is the quickstart's
# 2 x 128 GPT-2), at the report's batch 16 x 128 and 300 steps.
STATS_RECIPE = dict(learning_rate=3e-3, warmup_steps=10, decay_steps=100, decay_rate=0.7, weight_decay=0.01,
                    decay_embeddings=True, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
VARIANTS = {
    "default": dict(optim={"preset": "default"}),
    # optim.preset=keras alone: eps 1e-7, no clipping, no warmup (the preset's own values).
    "keras": dict(optim={"preset": "keras"}, drop=("warmup_steps", "eps", "clip_norm")),
    "accum4": dict(optim={"preset": "default"}, train={"grad_accum": 4}),
    "docmask": dict(optim={"preset": "default"}, data={"document_mask": True}),
}


# ----------------------------------------------------------------------------------- data

def year_csv(corpus: Path, years: tuple[str, ...], out: Path) -> Path:
    """The corpus rows whose `date` year is in `years`, as one CSV under the work folder."""
    if out.is_file():
        return out
    files = sorted(corpus.glob("arxiv_ml_2025_2026-0*.csv"))
    if not files:
        sys.exit(f"no corpus files in {corpus}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["title", "abstract", "date"])
        w.writeheader()
        for path in files:
            with open(path, newline="", encoding="utf-8") as g:
                for row in csv.DictReader(g):
                    if row["date"][:4] in years:
                        w.writerow({k: row[k] for k in ("title", "abstract", "date")})
    tmp.replace(out)
    return out


def data_section(work: Path, which: str) -> dict:
    src = work / "data" / ("train_2025.csv" if which == "train" else "heldout_2026.csv")
    return {"source": [str(src)], "template": TEMPLATE, "seq_len": 128, "val_fraction": 0.01,
            "shards_dir": str(work / f"shards_{which}"), "tokenizer": "gpt2"}


def prepare_data(work: Path, corpus: Path) -> dict:
    from flax_gpt.config_files import build_config
    from flax_gpt.data.prepare import prepare_shards

    year_csv(corpus, ("2025",), work / "data" / "train_2025.csv")
    year_csv(corpus, ("2026",), work / "data" / "heldout_2026.csv")
    out = {}
    for which in ("train", "heldout"):
        cfg = build_config({"data": data_section(work, which), "model": {**MODEL}})
        m = prepare_shards(cfg.data, log=None)
        out[which] = {k: m["splits"]["train"][k] for k in ("rows", "tokens", "documents")}
    return out


def heldout_rows(work: Path, n: int) -> np.ndarray:
    """n rows spread evenly over the held-out (2026) split, int32 (n, 128)."""
    from flax_gpt.data.shards import open_split

    rows = open_split(work / "shards_heldout", "train")
    idx = np.unique(np.linspace(0, rows.num_rows - 1, n).round().astype(np.int64))
    return rows.rows(idx), rows.eos_id


# ----------------------------------------------------------------------------------- shared pieces

def hf_config(**kw):
    from transformers import GPT2Config

    return GPT2Config(**MODEL, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, **kw)


def fresh_hf_model(seed: int):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(hf_config()).float()


def model_from_state(sd: dict):
    """A transformers model holding these HF-layout weights (numpy, `transformer.*` names)."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(hf_config()).float()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                                strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


def heldout_loss(sd: dict, tokens: np.ndarray, eos_id: int, batch: int = 32) -> dict:
    """THE evaluation: mean next-token NLL (nats) over the loader's loss mask of held-out rows,
    for HF-layout weights from either side, computed by transformers in float32."""
    import torch
    import torch.nn.functional as F

    from flax_gpt.data.loader import make_batch

    model = model_from_state(sd).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            b = make_batch(tokens[i:i + batch].copy(), eos_id=eos_id, document_mask=False, packing="pack")
            logits = model(torch.from_numpy(b["inputs"].astype(np.int64))).logits
            nll = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(b["targets"].astype(np.int64)).flatten(),
                                  reduction="none")
            m = torch.from_numpy(b["loss_mask"]).flatten()
            total += float((nll.double() * m.double()).sum())
            count += float(m.sum())
    return {"heldout_loss": total / count, "heldout_tokens": int(count), "heldout_rows": int(tokens.shape[0])}


def reference_lr(step: int, o: dict) -> float:
    """Learning rate of update `step` (0-based), float64, written from the documentation."""
    w = o["warmup_steps"]
    if step < w:
        return o["learning_rate"] * step / w
    p = (step - w) / o["decay_steps"]
    if o.get("staircase"):
        p = math.floor(p)
    return o["learning_rate"] * o["decay_rate"] ** p


def resolved_optim(variant: str, recipe: dict = RECIPE) -> dict:
    """The optim settings flax_gpt will actually use for this variant (preset applied)."""
    from flax_gpt.config_files import build_config

    return dict(build_config({"optim": optim_section(variant, recipe)}).optim.__dict__)


def optim_section(variant: str, recipe: dict = RECIPE) -> dict:
    v = VARIANTS[variant]
    base = {k: x for k, x in recipe.items() if k not in v.get("drop", ())}
    return {**base, **v["optim"]}


def flax_config(work: Path, run_dir: Path, variant: str, *, steps: int, seed: int, init_from: str,
                every: int, recipe: dict = RECIPE) -> dict:
    v = VARIANTS[variant]
    return {
        "model": {"preset": "tiny", **MODEL, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0,
                  "dtype": "float32", "init_from": init_from},
        "data": {**data_section(work, "train"), **v.get("data", {})},
        "optim": optim_section(variant, recipe),
        "train": {"run_dir": str(run_dir), "steps": steps, "batch_size": 16, "seed": seed, "eval_every": 0,
                  "log_every": 1, "progress": False, **v.get("train", {})},
        "mesh": {"data": -1},
        "checkpoint": {"every": every, "keep": 1000, "keep_best": False, "async_save": False},
    }


def run_flax(raw: dict, reuse: bool = False) -> tuple[list[dict], float]:
    """`python -m flax_gpt.cli train CONFIG` in a subprocess; its per-step metrics records.

    reuse: keep a finished run made from the identical config instead of training again."""
    import yaml

    run_dir = Path(raw["train"]["run_dir"])
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    done = run_dir / "done.json"
    if reuse and done.is_file() and cfg_path.is_file() and cfg_path.read_text() == yaml.safe_dump(raw, sort_keys=False):
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if "loss" in r], json.loads(done.read_text())["wall_s"]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-m", "flax_gpt.cli", "train", str(cfg_path)], check=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    done.write_text(json.dumps({"wall_s": wall}))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], wall


def flax_params_hf(run_dir: Path, step) -> dict:
    """flax_gpt's checkpoint `step` of a run, as an HF-layout numpy state dict."""
    import jax

    from flax_gpt.model.hf import to_hf_state_dict
    from flax_gpt.train.run_dir import RunDir

    cfg, params, _, _ = RunDir(run_dir).load_params(step)
    return to_hf_state_dict(jax.device_get(params), cfg.model)


def doc_positions(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment_ids) of packed rows as flax_gpt's step derives them on the devices
    (`flax_gpt.train.step.document_positions`), as int64 numpy for the torch side."""
    import jax

    from flax_gpt.train.step import document_positions

    pos, seg = jax.device_get(document_positions(np.asarray(inputs, np.int32), int(eos_id)))
    return np.asarray(pos, np.int64), np.asarray(seg, np.int64)


class TorchSide:
    """Plain PyTorch training of a transformers model (see the module docstring): `step(k, batch)`
    applies update k (0-based) to the numpy batch of the flax loader's step k."""

    def __init__(self, model, o: dict, *, grad_accum: int, document_mask: bool, eos_id: int,
                 clip_mode: str = "exact"):
        import torch

        self.model, self.o, self.grad_accum, self.document_mask, self.clip_mode = (
            model.train(), o, grad_accum, document_mask, clip_mode)
        self.eos_id, self.max_segments = int(eos_id), 1
        self.named = {}
        decay, keep = [], []
        for name, p in model.named_parameters():  # the tied lm_head is wte itself (listed once)
            is_emb = name.startswith(("transformer.wte.", "transformer.wpe."))
            (decay if p.ndim >= 2 and (o["decay_embeddings"] or not is_emb) else keep).append(p)
            self.named[name] = p
        self.params = decay + keep
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                                      {"params": keep, "weight_decay": 0.0}],
                                     lr=o["learning_rate"], betas=(o["b1"], o["b2"]), eps=o["eps"], foreach=False)

    def step(self, step: int, b: dict) -> dict:
        import torch
        import torch.nn.functional as F

        o, model = self.o, self.model
        lr = reference_lr(step, o)
        for g in self.opt.param_groups:
            g["lr"] = lr
        count = float(b["loss_mask"].sum())  # target tokens of the whole global batch
        mb = b["inputs"].shape[0] // self.grad_accum
        loss_sum = 0.0
        if self.document_mask:
            positions, segment_ids = doc_positions(b["inputs"], self.eos_id)
            if "segment_ids" in b:  # the host loader's make_batch computes the same values
                assert np.array_equal(positions, b["positions"]) and np.array_equal(segment_ids, b["segment_ids"])
            self.max_segments = max(self.max_segments, int(segment_ids.max()))
        for a in range(self.grad_accum):
            sl = slice(a * mb, (a + 1) * mb)
            ids = torch.from_numpy(b["inputs"][sl].astype(np.int64))
            kw = {}
            if self.document_mask:
                seg = torch.from_numpy(segment_ids[sl])
                T = ids.shape[1]
                causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
                kw["attention_mask"] = (causal[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
                kw["position_ids"] = torch.from_numpy(positions[sl])
            logits = model(input_ids=ids, **kw).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(),
                                  torch.from_numpy(b["targets"][sl].astype(np.int64)).flatten(), reduction="none")
            m = torch.from_numpy(b["loss_mask"][sl]).flatten()
            ls = (nll * m).sum()
            (ls / max(count, 1.0)).backward()
            loss_sum += float(ls.detach())
        # Global norm in float64: torch's float32 CPU norm of the 6.4M-entry wte gradient is low
        # by ~4e-4 relative (measured: 0.39555 vs 0.39570), which alone moves clip_grad_norm_'s
        # coefficient by ~3e-5 a step. `--torch-clip native` uses clip_grad_norm_ as is.
        if self.clip_mode == "native" and o["clip_norm"] > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(self.params, o["clip_norm"]))
        else:
            gn = math.sqrt(sum(float(torch.sum(p.grad.double() ** 2)) for p in self.params))
            if o["clip_norm"] > 0 and gn > o["clip_norm"]:
                with torch.no_grad():
                    for p in self.params:
                        p.grad.mul_(o["clip_norm"] / gn)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"step": step + 1, "loss": loss_sum / max(count, 1.0), "grad_norm": gn, "lr": lr}

    def load(self, params: dict, mu: dict, nu: dict, count: int) -> None:
        """Set weights and AdamW moments (HF-layout numpy dicts) and the update count."""
        import torch

        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(torch.from_numpy(np.asarray(params[name])))
                st = self.opt.state[p]
                st["step"] = torch.tensor(float(count))
                st["exp_avg"] = torch.from_numpy(np.array(mu[name], np.float32))
                st["exp_avg_sq"] = torch.from_numpy(np.array(nu[name], np.float32))


def train_torch(model, loader, o: dict, *, steps: int, grad_accum: int, document_mask: bool,
                on_step=None, threads: int | None = None, clip_mode: str = "exact") -> list[dict]:
    """Free-running plain PyTorch training on the loader's batches."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    side = TorchSide(model, o, grad_accum=grad_accum, document_mask=document_mask, eos_id=loader.rows.eos_id,
                     clip_mode=clip_mode)
    records = []
    for step in range(steps):
        b = {k: np.array(v) for k, v in loader.local_batch(step).items()}  # copies: pooled buffers
        rec = side.step(step, b)
        records.append(rec)
        if on_step is not None:
            on_step(step + 1, model, rec)
    return records


def torch_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def param_diff(a: dict, b: dict) -> dict:
    """Relative difference of two HF-layout state dicts: global, and the worst tensor."""
    num = den = 0.0
    worst, worst_name = 0.0, ""
    for k in b:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        d, n = float(np.sum((x - y) ** 2)), float(np.sum(y ** 2))
        num, den = num + d, den + n
        r = math.sqrt(d / n) if n > 0 else math.sqrt(d)
        if r > worst:
            worst, worst_name = r, k
    return {"rel": math.sqrt(num / den), "worst_tensor_rel": worst, "worst_tensor": worst_name}


def machine() -> dict:
    """Where the numbers were measured: platform, CPU count, library versions, load average (1, 5,
    15 min) when the result was written (the host may be shared: timings are indicative only)."""
    import jax
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "jax_backend": jax.default_backend(), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------------- commands

def cmd_parity(args) -> dict:
    from flax_gpt.data.loader import TrainLoader
    from flax_gpt.data.shards import open_split

    work, variant = Path(args.work), args.variant
    v = VARIANTS[variant]
    o = resolved_optim(variant)
    grad_accum = v.get("train", {}).get("grad_accum", 1)
    document_mask = v.get("data", {}).get("document_mask", False)
    init_dir = work / f"hf_init_seed{args.seed}"
    if not (init_dir / "model.safetensors").is_file():
        fresh_hf_model(args.seed).save_pretrained(str(init_dir), safe_serialization=True)
    run_dir = work / "runs" / f"parity_{variant}_s{args.seed}"
    raw = flax_config(work, run_dir, variant, steps=args.steps, seed=args.seed, init_from=str(init_dir),
                      every=args.every)
    flax_recs, flax_wall = run_flax(raw, reuse=args.reuse_flax)
    assert [r["step"] for r in flax_recs] == list(range(1, args.steps + 1)), "flax metrics are not one per step"
    # Step 0 must be the imported weights exactly (flax_gpt writes no step-0 checkpoint: compare
    # the import path instead).
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(init_dir)).float()
    rows = open_split(work / "shards_train", "train")
    loader = TrainLoader(rows, global_batch=16, seed=args.seed, document_mask=document_mask, packing="pack",
                         sharding=None, prefetch=0)
    diffs = []

    def on_step(step, m, rec):
        if step % args.every == 0 or step == args.steps:
            d = param_diff(flax_params_hf(run_dir, step), torch_state(m))
            diffs.append({"step": step, **d})
            f = flax_recs[step - 1]
            print(f"[{variant}] step {step}: loss torch {rec['loss']:.6f} flax {f['loss']:.6f} "
                  f"|d| {abs(rec['loss'] - f['loss']):.2e}  param rel diff {d['rel']:.2e}", flush=True)

    t0 = time.time()
    torch_recs = train_torch(model, loader, o, steps=args.steps, grad_accum=grad_accum,
                             document_mask=document_mask, on_step=on_step, clip_mode=args.torch_clip)
    torch_wall = time.time() - t0
    loss_d = [abs(a["loss"] - b["loss"]) for a, b in zip(torch_recs, flax_recs)]
    gn_rel = [abs(a["grad_norm"] - b["grad_norm"]) / max(a["grad_norm"], 1e-12) for a, b in zip(torch_recs, flax_recs)]
    lr_rel = [abs(a["lr"] - b["lr"]) / max(a["lr"], 1e-12) if a["lr"] > 0 else abs(b["lr"])
              for a, b in zip(torch_recs, flax_recs)]
    result = {
        "benchmark": "training_parity", "mode": "free", "variant": variant, "seed": args.seed,
        "steps": args.steps, "every": args.every, "machine": machine(), "optim_resolved": o, "grad_accum": grad_accum,
        "document_mask": document_mask, "model": MODEL, "batch": [16, 128], "torch_clip": args.torch_clip,
        "flax_wall_s": flax_wall, "torch_wall_s": torch_wall,
        "max_abs_loss_diff": max(loss_d), "argmax_loss_diff_step": int(np.argmax(loss_d)) + 1,
        "mean_abs_loss_diff": float(np.mean(loss_d)),
        "max_rel_grad_norm_diff": max(gn_rel), "max_lr_diff": max(lr_rel),
        "final_param_rel_diff": diffs[-1]["rel"], "param_diffs": diffs,
        "loss_first_last": {"torch": [torch_recs[0]["loss"], torch_recs[-1]["loss"]],
                            "flax": [flax_recs[0]["loss"], flax_recs[-1]["loss"]]},
        "per_step": {"torch_loss": [r["loss"] for r in torch_recs], "flax_loss": [r["loss"] for r in flax_recs],
                     "torch_grad_norm": [r["grad_norm"] for r in torch_recs],
                     "flax_grad_norm": [r["grad_norm"] for r in flax_recs],
                     "torch_lr": [r["lr"] for r in torch_recs], "flax_lr": [r["lr"] for r in flax_recs]},
    }
    if args.heldout:
        toks, eos = heldout_rows(work, args.heldout)
        result["heldout"] = {"flax": heldout_loss(flax_params_hf(run_dir, args.steps), toks, eos),
                             "torch": heldout_loss(torch_state(model), toks, eos)}
    return result


def cmd_stats(args) -> dict:
    from flax_gpt.data.loader import TrainLoader
    from flax_gpt.data.shards import open_split

    work = Path(args.work)
    o = resolved_optim("default", STATS_RECIPE)
    toks, eos = heldout_rows(work, args.heldout)
    t0 = time.time()
    tag = f"{args.side}_s{args.seed}" + (f"_{args.tag}" if args.tag else "")
    if args.side == "flax":
        run_dir = work / "runs" / f"stats_{tag}"
        init_from = ""
        if args.init == "hf":  # transformers' own init of this seed, imported
            init_from = str(work / f"hf_init_seed{args.seed}")
            if not (Path(init_from) / "model.safetensors").is_file():
                fresh_hf_model(args.seed).save_pretrained(init_from, safe_serialization=True)
        raw = flax_config(work, run_dir, "default", steps=args.steps, seed=args.seed, init_from=init_from, every=0,
                          recipe=STATS_RECIPE)
        for kv in args.override:
            section, key = kv.split("=", 1)[0].split(".")
            raw[section][key] = json.loads(kv.split("=", 1)[1])
        recs, _ = run_flax(raw, reuse=args.reuse_flax)
        sd = flax_params_hf(run_dir, args.steps)
    else:
        if args.init == "flax":  # flax_gpt's own init of this seed (StateBuilder.fresh), exported
            import jax

            from flax_gpt.config_files import build_config
            from flax_gpt.model.hf import to_hf_state_dict
            from flax_gpt.train.state import StateBuilder

            cfg = build_config(flax_config(work, work / "runs" / "unused", "default", steps=args.steps,
                                           seed=args.seed, init_from="", every=0, recipe=STATS_RECIPE))
            st = StateBuilder(cfg, args.steps).fresh()
            model = model_from_state(to_hf_state_dict(jax.device_get(st.params), cfg.model))
        else:
            model = fresh_hf_model(args.seed)
        rows = open_split(work / "shards_train", "train")
        loader = TrainLoader(rows, global_batch=16, seed=args.seed, document_mask=False, packing="pack",
                             sharding=None, prefetch=0)
        recs = train_torch(model, loader, o, steps=args.steps, grad_accum=1, document_mask=False)
        sd = torch_state(model)
    wall = time.time() - t0
    ev = heldout_loss(sd, toks, eos)
    print(json.dumps({"side": args.side, "seed": args.seed, **ev}), flush=True)
    return {"benchmark": "training_parity_stats", "side": args.side, "seed": args.seed, "tag": args.tag,
            "init": args.init,
            "override": args.override, "steps": args.steps, "optim": o, "machine": machine(), "wall_s": wall,
            **ev, "train_loss_last10": float(np.mean([r["loss"] for r in recs[-10:]])),
            "train_loss": [r["loss"] for r in recs]}


def cmd_lockstep(args) -> dict:
    """Every update from the same state on both sides: before update k the torch model and its
    AdamW moments/count are set to flax_gpt's state, then flax_gpt's own jitted step
    (`StateBuilder.step_fn`, on `TrainLoader.global_batch(k)` with its batch sharding) and the
    torch step (on `local_batch(k)`) each apply update k. Measures the one-step error at every
    step of the run, free of the amplification a free run accumulates (a loss spike turns 1e-6
    into 1e-2 within ~25 steps at this learning rate)."""
    import jax
    import optax
    from transformers import GPT2LMHeadModel

    from flax_gpt.config_files import build_config
    from flax_gpt.data.loader import TrainLoader
    from flax_gpt.data.shards import open_split
    from flax_gpt.model.hf import to_hf_state_dict
    from flax_gpt.train.state import StateBuilder

    work, variant = Path(args.work), args.variant
    o = resolved_optim(variant)
    init_dir = work / f"hf_init_seed{args.seed}"
    if not (init_dir / "model.safetensors").is_file():
        fresh_hf_model(args.seed).save_pretrained(str(init_dir), safe_serialization=True)
    cfg = build_config(flax_config(work, work / "runs" / f"lockstep_{variant}", variant, steps=args.steps,
                                   seed=args.seed, init_from=str(init_dir), every=0))
    rows = open_split(cfg.data.shards_dir, "train", vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)
    builder = StateBuilder(cfg, args.steps, eos_id=rows.eos_id)
    state = builder.fresh(builder.params_from(str(init_dir), say=lambda *a, **k: None))
    loader = TrainLoader(rows, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                         document_mask=cfg.data.document_mask, packing=cfg.data.packing,
                         sharding=builder.batch_sh, prefetch=0)
    side = TorchSide(GPT2LMHeadModel.from_pretrained(str(init_dir)).float(), o,
                     grad_accum=cfg.train.grad_accum, document_mask=cfg.data.document_mask, eos_id=rows.eos_id)
    def hf(tree):
        return to_hf_state_dict(tree, cfg.model)

    recs = []
    t0 = time.time()
    for k in range(args.steps):
        host = jax.tree.map(lambda x: np.array(x, copy=True),  # copied before the step donates it
                            jax.device_get(state.replace(rng=jax.random.key_data(state.rng))))
        adam = next(x for x in jax.tree_util.tree_leaves(
            host.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState))
        assert int(host.step) == k == int(adam.count), (int(host.step), k, int(adam.count))
        before = hf(host.params)
        side.load(before, hf(adam.mu), hf(adam.nu), k)
        b = {key: np.array(x) for key, x in loader.local_batch(k).items()}
        state, m = builder.step_fn(state, loader.global_batch(k))
        t = side.step(k, b)
        m = jax.device_get(m)
        f_after, t_after = hf(jax.device_get(state.params)), torch_state(side.model)
        num = den = num_nk = den_nk = 0.0
        for name in t_after:
            du_f = np.float64(f_after[name]) - before[name]
            du_t = np.float64(t_after[name]) - before[name]
            num += float(np.sum((du_f - du_t) ** 2))
            den += float(np.sum(du_t ** 2))
            if name.endswith("attn.c_attn.bias"):  # [q | k | v]: leave out the key bias
                D = du_t.shape[0] // 3
                du_f, du_t = np.concatenate([du_f[:D], du_f[2 * D:]]), np.concatenate([du_t[:D], du_t[2 * D:]])
            num_nk += float(np.sum((du_f - du_t) ** 2))
            den_nk += float(np.sum(du_t ** 2))
        rec = {"step": k + 1, "flax_loss": float(m["loss"]), "torch_loss": t["loss"],
               "flax_grad_norm": float(m["grad_norm"]), "torch_grad_norm": t["grad_norm"],
               "flax_lr": float(m["lr"]), "torch_lr": t["lr"],
               "update_rel_diff": math.sqrt(num / den) if den > 0 else math.sqrt(num),
               # The key bias's gradient is exactly 0 in exact arithmetic (it adds q.b_k to every
               # score of a query row, which softmax ignores), so both sides feed Adam rounding
               # noise there and its updates differ by ~100%; it has no effect on the model.
               "update_rel_diff_no_key_bias": math.sqrt(num_nk / den_nk) if den_nk > 0 else math.sqrt(num_nk),
               "param_rel_diff": param_diff(f_after, t_after)["rel"]}
        recs.append(rec)
        if (k + 1) % args.every == 0:
            print(f"[lockstep {variant}] step {k + 1}: |dloss| {abs(rec['flax_loss'] - rec['torch_loss']):.1e} "
                  f"update rel diff {rec['update_rel_diff']:.1e} (without key biases "
                  f"{rec['update_rel_diff_no_key_bias']:.1e}) ({time.time() - t0:.0f}s)", flush=True)
    upd = [r["update_rel_diff"] for r in recs if r["torch_lr"] > 0]
    upd_nk = [r["update_rel_diff_no_key_bias"] for r in recs if r["torch_lr"] > 0]
    return {"benchmark": "training_parity_lockstep", "mode": "lockstep", "variant": variant, "seed": args.seed,
            "steps": args.steps, "model": MODEL, "batch": [cfg.train.batch_size, cfg.data.seq_len],
            "machine": machine(), "optim_resolved": o, "grad_accum": cfg.train.grad_accum,
            "document_mask": cfg.data.document_mask, "wall_s": time.time() - t0,
            "max_abs_loss_diff": max(abs(r["flax_loss"] - r["torch_loss"]) for r in recs),
            "max_update_rel_diff": max(upd), "median_update_rel_diff": float(np.median(upd)),
            "max_update_rel_diff_no_key_bias": max(upd_nk),
            "median_update_rel_diff_no_key_bias": float(np.median(upd_nk)),
            "argmax_update_rel_diff_step": recs[int(np.argmax([r["update_rel_diff"] if r["torch_lr"] > 0 else 0
                                                               for r in recs]))]["step"],
            "max_rel_grad_norm_diff": max(abs(r["flax_grad_norm"] - r["torch_grad_norm"]) / r["torch_grad_norm"]
                                          for r in recs),
            "max_lr_rel_diff": max(abs(r["flax_lr"] - r["torch_lr"]) / r["torch_lr"] if r["torch_lr"] else
                                   abs(r["flax_lr"]) for r in recs),
            "max_param_rel_diff_after_one_step": max(r["param_rel_diff"] for r in recs),
            **({"max_segments_per_row": side.max_segments} if cfg.data.document_mask else {}),
            "per_step": recs}


def cmd_control(args) -> dict:
    """Torch against torch: the same run twice on the same batches, once with transformers' sdpa
    attention and once with its eager attention (float32 rounding differences only). Shows how
    fast this recipe amplifies rounding noise, to judge flax-vs-torch differences against."""
    from transformers import GPT2LMHeadModel

    from flax_gpt.data.loader import TrainLoader
    from flax_gpt.data.shards import open_split

    work = Path(args.work)
    o = resolved_optim(args.variant)
    v = VARIANTS[args.variant]
    init_dir = work / f"hf_init_seed{args.seed}"
    rows = open_split(work / "shards_train", "train")
    runs = {}
    for impl in ("sdpa", "eager"):
        model = GPT2LMHeadModel.from_pretrained(str(init_dir), attn_implementation=impl).float()
        loader = TrainLoader(rows, global_batch=16, seed=args.seed, document_mask=False, packing="pack",
                             sharding=None, prefetch=0)
        recs = train_torch(model, loader, o, steps=args.steps, grad_accum=v.get("train", {}).get("grad_accum", 1),
                           document_mask=False)
        runs[impl] = (recs, torch_state(model))
    a, b = runs["sdpa"][0], runs["eager"][0]
    loss_d = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    res = {"benchmark": "training_parity_control", "variant": args.variant, "seed": args.seed, "steps": args.steps,
           "machine": machine(), "max_abs_loss_diff": max(loss_d), "final_param_rel_diff":
           param_diff(runs["eager"][1], runs["sdpa"][1])["rel"],
           "per_step": {"sdpa_loss": [r["loss"] for r in a], "eager_loss": [r["loss"] for r in b],
                        "sdpa_grad_norm": [r["grad_norm"] for r in a], "eager_grad_norm": [r["grad_norm"] for r in b]}}
    parity = Path(args.out) / f"{PREFIX}free_{args.variant}_s{args.seed}.json"
    if parity.is_file():  # the flax run of the same variant, for a three-way view
        f = json.loads(parity.read_text())["per_step"]
        res["per_step"]["flax_loss"] = f["flax_loss"][: args.steps]
        res["per_step"]["flax_grad_norm"] = f["flax_grad_norm"][: args.steps]
    return res


def cmd_summary(args) -> None:
    out = Path(args.out)
    for p in sorted(out.glob(f"{PREFIX}free_*.json")):
        r = json.loads(p.read_text())
        print(f"{r['variant']:8s} seed {r['seed']} steps {r['steps']}: max|dloss| {r['max_abs_loss_diff']:.2e} "
              f"(step {r['argmax_loss_diff_step']}), final param rel diff {r['final_param_rel_diff']:.2e}, "
              f"max grad-norm rel diff {r['max_rel_grad_norm_diff']:.2e}, max lr diff {r['max_lr_diff']:.1e}")
    for p in sorted(out.glob(f"{PREFIX}lockstep_*.json")):
        r = json.loads(p.read_text())
        print(f"lockstep {r['variant']:8s} steps {r['steps']}: max|dloss| {r['max_abs_loss_diff']:.1e}, "
              f"update rel diff median {r['median_update_rel_diff']:.1e} max {r['max_update_rel_diff']:.1e} "
              f"(without key biases: "
              f"{r.get('median_update_rel_diff_no_key_bias', float('nan')):.1e} / "
              f"{r.get('max_update_rel_diff_no_key_bias', float('nan')):.1e}), max grad-norm rel diff "
              f"{r['max_rel_grad_norm_diff']:.1e}, max lr rel diff {r['max_lr_rel_diff']:.1e}")
    for p in sorted(out.glob(f"{PREFIX}control_*.json")):
        r = json.loads(p.read_text())
        print(f"control torch-sdpa vs torch-eager {r['variant']} steps {r['steps']}: max|dloss| "
              f"{r['max_abs_loss_diff']:.2e}, final param rel diff {r['final_param_rel_diff']:.2e}")
    by = {}
    for p in sorted(out.glob(f"{PREFIX}stats_*.json")):
        r = json.loads(p.read_text())
        by.setdefault((r["side"], r.get("tag") or ""), []).append(r["heldout_loss"])
    for (side, tag), v in sorted(by.items()):
        spread = np.std(v, ddof=1) if len(v) > 1 else 0
        print(f"{side:5s} {tag:12s} n={len(v)} heldout {np.mean(v):.4f} +- {spread:.4f} "
              f"(min {min(v):.4f} max {max(v):.4f})")


def cmd_plot(args) -> Path:
    """One PNG of the free run next to its controls: the three loss curves (flax_gpt, torch sdpa,
    torch eager) and, on a log scale, |flax - torch| against |torch eager - torch sdpa| per step,
    with the lockstep run's one-update |loss diff| as the floor that method differences would lift."""
    from flax_gpt.report.plots import ema, new_figure, plot_line, save, style

    def per_step(mode: str):
        path = Path(args.out) / f"{PREFIX}{mode}_{args.variant}_s{args.seed}.json"
        return json.loads(path.read_text())["per_step"] if path.is_file() else None

    free, ctl, lock = per_step("free"), per_step("control"), per_step("lockstep")
    if free is None:
        sys.exit(f"no free run of {args.variant} seed {args.seed} in {args.out}; run `parity` first")
    out = Path(args.out)
    f, t = np.array(free["flax_loss"]), np.array(free["torch_loss"])
    x = np.arange(1, len(f) + 1)
    fig, (curves, diffs) = new_figure(2)
    plot_line(curves, x, ema(f, 0.9), "flax_gpt (EMA 0.9)", color="tab:blue")
    plot_line(curves, x, ema(t, 0.9), "PyTorch, sdpa attention (EMA 0.9)", color="tab:orange")
    plot_line(diffs, x, np.abs(f - t), "|flax_gpt - PyTorch|, run freely", color="tab:blue", alpha=0.8)
    if ctl is not None:
        e = np.array(ctl["eager_loss"][: len(f)])
        plot_line(curves, x[: len(e)], ema(e, 0.9), "PyTorch, eager attention (EMA 0.9)", color="tab:green")
        plot_line(diffs, x[: len(e)], np.abs(e - t[: len(e)]), "|PyTorch eager - PyTorch sdpa|, run freely",
                  color="tab:green", alpha=0.8)
    if lock is not None:
        plot_line(diffs, [r["step"] for r in lock], [max(abs(r["flax_loss"] - r["torch_loss"]), 1e-9) for r in lock],
                  "|flax_gpt - PyTorch|, lockstep (same state each step)", color="black")
    diffs.set_yscale("log")
    style(curves, f"Training loss, {args.variant} recipe, seed {args.seed}", "step", "cross-entropy (nats/token)")
    style(diffs, "Loss difference per step", "step", "|loss difference| (nats)")
    path = out / f"{PREFIX}{args.variant}_s{args.seed}.png"
    save(fig, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(DEFAULT_WORK), help="work folder (data, runs); outside the repository")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where training_parity_*.json are written")
    sub = p.add_subparsers(dest="cmd", required=True)
    p.add_argument("--reuse-flax", action="store_true", help="keep a finished flax run of the identical config")
    sub.add_parser("data")
    q = sub.add_parser("parity")
    q.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--every", type=int, default=25)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--heldout", type=int, default=0, help="also evaluate both on this many held-out rows")
    q.add_argument("--torch-clip", choices=("exact", "native"), default="exact",
                   help="torch side: float64 global norm (exact) or torch.nn.utils.clip_grad_norm_ (native)")
    s = sub.add_parser("stats")
    s.add_argument("--side", choices=("flax", "torch"), required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--heldout", type=int, default=768)
    s.add_argument("--tag", default="")
    s.add_argument("--init", choices=("own", "hf", "flax"), default="own",
                   help="initial weights: the side's own init, transformers' init of --seed, or flax_gpt's")
    s.add_argument("--override", action="append", default=[], help="flax side: section.key=JSON")
    ls = sub.add_parser("lockstep")
    ls.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    ls.add_argument("--steps", type=int, default=300)
    ls.add_argument("--every", type=int, default=25)
    ls.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("control")
    c.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--seed", type=int, default=0)
    sub.add_parser("summary")
    pl = sub.add_parser("plot")
    pl.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    pl.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work = Path(args.work).resolve()
    if work == ROOT or ROOT in work.parents:
        sys.exit(f"--work {work} is inside the repository; choose a folder outside it")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "data":
        print(json.dumps(prepare_data(Path(args.work), Path(args.corpus))))
    elif args.cmd == "parity":
        r = cmd_parity(args)
        suffix = "" if args.torch_clip == "exact" else f"_{args.torch_clip}clip"
        (out / f"{PREFIX}free_{args.variant}_s{args.seed}{suffix}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps({k: r[k] for k in ("variant", "max_abs_loss_diff", "final_param_rel_diff")}))
    elif args.cmd == "stats":
        r = cmd_stats(args)
        name = f"{PREFIX}stats_{args.side}_s{args.seed}" + (f"_{args.tag}" if args.tag else "")
        (out / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
    elif args.cmd == "lockstep":
        r = cmd_lockstep(args)
        (out / f"{PREFIX}lockstep_{args.variant}_s{args.seed}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps({k: r[k] for k in ("variant", "max_abs_loss_diff", "max_update_rel_diff",
                                             "max_update_rel_diff_no_key_bias")}))
    elif args.cmd == "control":
        r = cmd_control(args)
        (out / f"{PREFIX}control_{args.variant}_s{args.seed}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps({k: r[k] for k in ("variant", "max_abs_loss_diff", "final_param_rel_diff")}))
    elif args.cmd == "plot":
        print(cmd_plot(args))
    else:
        cmd_summary(args)


if __name__ == "__main__":
    main()
