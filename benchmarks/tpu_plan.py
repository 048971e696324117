"""The README's TPU planning table: `flax-gpt compile` (flax_gpt/bench/tpu_compile.py) for the GPT-2
family at seq 1024, bf16, on Cloud TPU slices, compiled on this host for, not run on, the TPU.

    nice -n 15 python benchmarks/tpu_plan.py              # compile what is missing, then print the table
    python benchmarks/tpu_plan.py --table                 # only print the table from the JSON
    python benchmarks/tpu_plan.py --models gpt2 --slices v5e-8 --no-max-batch

Settings: configs/distilgpt2_arxiv.yaml (bf16, pad_vocab_to 128, attn_pdrop 0, AdamW, batch 32)
with model.preset swapped and model.init_from="" (shapes only: no Hub download); the pod slice
shards parameters and optimizer state over all 256 chips at one sequence per chip, with remat.
Needs libtpu (`pip install -e ".[tpu]"` or TPU_LIBRARY_PATH). Compiles are slow on a small CPU
host (minutes each, growing with the layer count), so every finished step is written to
benchmarks/results/tpu_plan.json at once and a rerun skips what is there; `--budget-min` stops
starting new work after that many minutes and records what was left and why. Not imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flax_gpt.bench import tpu_compile  # noqa: E402
from flax_gpt.config_files import load_config  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "tpu_plan.json"
MODELS = ["distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
BASE = ["model.init_from=", "data.seq_len=1024", "model.dtype=bfloat16", "model.pad_vocab_to=128",
        "train.steps=1000", "train.progress=false"]
SINGLE_HOST = ["v5e-8", "v4-8", "v5p-8", "v6e-8"]
POD = "v5e-256"
SLICES = {  # name -> extra overrides
    "v5e-8": [], "v4-8": [], "v5p-8": [], "v6e-8": [],
    # the pod slice: parameters and optimizer state sharded over all 256 chips, one sequence per
    # chip, blocks recomputed in the backward pass
    POD: ["mesh.data=1", "mesh.fsdp=-1", "train.batch_size=256", "model.remat=true"],
}
# gpt2-xl does not fit there: its width 1600 does not split 256 ways, and with mesh.fsdp=64
# mesh.data=4 the compiler asks for 18.5 GiB of temporaries per chip, with or without remat
# (both attempts are kept in the JSON under pod_attempts). gpt2-large (width 1280 = 256 x 5) is the
# largest preset that shards over the whole slice.
POD_MODEL = "gpt2-large"
TABLE_MODELS = MODELS[:3]  # the README's table: distilgpt2, gpt2, gpt2-medium on every single-host slice
ROWS = [(m, s) for m in TABLE_MODELS for s in SINGLE_HOST] + [(m, "v5e-8") for m in MODELS[3:]] + [(POD_MODEL, POD)]
# Work in order of value per compile-minute (compile time grows with the layer count and is about
# three times longer for v4 than for v5e on this host): distilgpt2 everywhere with its largest
# batch on v5e-8, then gpt2, gpt2-medium, the other largest batches, the large models, the pod.
PRIORITY = ([("batch", "distilgpt2", s) for s in SINGLE_HOST] + [("max", "distilgpt2", "v5e-8")]
            + [("batch", m, s) for m in TABLE_MODELS[1:] for s in SINGLE_HOST]
            + [("max", m, s) for m in TABLE_MODELS for s in SINGLE_HOST]
            + [("batch", m, "v5e-8") for m in MODELS[3:]] + [("batch", POD_MODEL, POD)])
GiB = 1024**3


def load() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}, "not_compiled": {}}


def save(doc: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, OUT)


def machine() -> dict:
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0]}


def config(model: str, slice_name: str):
    return load_config(str(ROOT / "configs" / "distilgpt2_arxiv.yaml"),
                       BASE + [f"model.preset={model}"] + SLICES[slice_name])


def table(doc: dict) -> str:
    head = ("| model | slice (chips, hosts) | mesh | batch × 1024 | HBM/device at that batch | GB/device-step "
            "| largest batch | est. tokens/s | est. MFU | compile |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines, missing = [], []
    for model, sl in ROWS:
        r = doc["rows"].get(f"{model}@{sl}")
        if r is None:
            why = doc["not_compiled"].get(f"{model}@{sl}")
            missing.append(f"{model} on {sl}" + (f" ({why})" if why else ""))
            continue
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        hbm = r["hbm_per_device_bytes"]["total"] / GiB
        fit = f"{hbm:.1f} of {r['hbm_capacity_bytes'] / GiB:.2f} GiB" + ("" if r["fits"] else " **no fit**")
        mb = r.get("max_batch")
        mb = "–" if mb is None else f"{mb}" + ("" if r["max_batch_search"]["exact"] else "*")
        tps = f"{r['est_tokens_per_sec']:,.0f}" if r["est_tokens_per_sec"] and r["fits"] else "–"
        mfu = f"{r['est_mfu']:.0%}" if r["est_mfu"] and r["fits"] else "–"
        gb = r.get("bytes_accessed_per_device_step_used")
        gb = f"{gb / 1e9:.1f}" if gb else "–"
        lines.append(f"| {model} | {sl} ({r['chips']}, {r['hosts']}) | {mesh} | {r['batch_size']} | {fit} | {gb} "
                     f"| {mb} | {tps} | {mfu} | {r['compile_time_s']:.0f} s |")
    tail = (f"\n\nNot compiled yet (a rerun of benchmarks/tpu_plan.py fills them): {'; '.join(missing)}."
            if missing else "")
    return head + "\n".join(lines) + tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--slices", nargs="+", default=list(SLICES), choices=list(SLICES))
    ap.add_argument("--no-max-batch", action="store_true", help="only the config's batch")
    ap.add_argument("--max-compiles", type=int, default=4, help="compiles per largest-batch search")
    ap.add_argument("--budget-min", type=float, default=0, help="start no new compile after this many minutes")
    ap.add_argument("--table", action="store_true", help="print the table from the JSON and stop")
    args = ap.parse_args()
    doc = load()
    if args.table:
        print(table(doc))
        return 0
    t_start = time.time()
    over = lambda: args.budget_min and time.time() - t_start > 60 * args.budget_min
    stages = [(st, m, s) for st, m, s in PRIORITY if m in args.models and s in args.slices
              and not (st == "max" and args.no_max_batch)]
    for stage, model, sl in stages:
        key = f"{model}@{sl}"
        row = doc["rows"].get(key)
        if (stage == "batch" and row) or (stage == "max" and (not row or "max_batch" in row)):
            continue
        if over():
            why = f"over the {args.budget_min:.0f}-minute compile budget on this host"
            if stage == "max":
                row["max_batch_note"] = f"largest-batch search not run: {why}"
            else:
                doc["not_compiled"].setdefault(key, why)
            save(doc)
            continue
        t0 = time.time()
        try:
            run_stage(doc, stage, key, config(model, sl), sl, args.max_compiles)
        except Exception as e:  # noqa: BLE001 - record it and go on with the next combination
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if stage == "max":
                row["max_batch_note"] = f"largest-batch search failed: {why}"
            else:
                doc["not_compiled"][key] = why
        doc["settings"] = {"config": "configs/distilgpt2_arxiv.yaml", "overrides": BASE, "slices": SLICES}
        save(doc)
        print(f"  done in {time.time() - t0:.0f} s", flush=True)
    print(table(doc))
    return 0


def run_stage(doc: dict, stage: str, key: str, cfg, sl: str, max_compiles: int) -> None:
    """One compile at the config's batch ("batch"), or the largest-batch search from it ("max")."""
    t0 = time.time()
    if stage == "batch":
        print(f"{key}: compiling batch {cfg.train.batch_size}", flush=True)
        row = tpu_compile.compile_for_topology(cfg, sl)
        row.update(wall_s=round(time.time() - t0, 1), machine=machine())
        doc["rows"][key] = row
        doc["not_compiled"].pop(key, None)
        return
    print(f"{key}: largest batch", flush=True)
    row = doc["rows"][key]
    gen, _, devices = tpu_compile.topology_devices(sl)
    unit = row["mesh"]["data"] * row["mesh"]["fsdp"] * cfg.train.grad_accum
    found = tpu_compile.search_max_batch(
        lambda b: row if b == row["batch_size"] else
        tpu_compile.compile_step(tpu_compile.with_batch(cfg, b), gen, devices),
        row["batch_size"], unit, row["hbm_capacity_bytes"], max_compiles=max_compiles,
        say=lambda line: print("  " + line, flush=True))
    row["max_batch"] = found["max_batch"]
    row["max_batch_search"] = {
        "compiles": found["compiles"], "exact": found["exact"], "batch_multiple": unit,
        "wall_s": round(time.time() - t0, 1),
        "tried": {str(k): {"fits": v["fits"], "hbm_total": v["hbm_per_device_bytes"]["total"],
                           "flops_xla": v["flops_per_device_step_xla"], "compile_time_s": v["compile_time_s"]}
                  for k, v in sorted(found["results"].items())}}


if __name__ == "__main__":
    sys.exit(main())
