#!/usr/bin/env bash
# The GPU figures in one go (about 6-8 minutes on one H100/H200), JSON into benchmarks/results/:
#   1. `flax-gpt bench`: distilgpt2, T=1024, bf16, batch 32 (configs/distilgpt2_arxiv.yaml on the
#      synthetic corpus, random init) against PyTorch eager and torch.compile, with MFU;
#   2. the generation benchmark (benchmarks/generate.py);
#   3. A/B of the same step: cuDNN attention (model.attention=cudnn) vs XLA's, and vocab padding
#      (model.pad_vocab_to=0) vs 128;
# then gpu_check_summary.json with the figures side by side and the targets (>= 40% MFU,
# >= 1.5x PyTorch eager).
#
#   pip install -e ".[cuda]" && pip install torch   # a CUDA build of torch for the baseline
#   bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --smoke [OUT_DIR]  # the same steps on CPU at tiny shapes (CI); JSON
#                                                   # to OUT_DIR (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  out="${2:-$(mktemp -d)}"
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--smoke [OUT_DIR]]" >&2
  exit 2
else
  out=benchmarks/results
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=${PYTHON:-python}

if [[ $smoke == 1 ]]; then
  export JAX_PLATFORMS=cpu
  # tiny shapes in float32 (CPU bf16 matmuls are slow in torch), two timed steps; torch.compile is
  # left out (minutes of compiling on a CPU)
  shapes=(model.preset=tiny model.n_positions=1024 data.seq_len=64 train.batch_size=8 data.synthetic_docs=300
          model.dtype=float32)
  bench_args=(--steps 2 --warmup 1)
  baseline=eager
  gen_args=(--reps 1 --new-tokens 8 --prompt-len 4 --batches 1)
  tag=smoke
else
  if ! "$py" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
    echo "error: no GPU visible to JAX; install the extra (pip install -e \".[cuda]\") or use --smoke" >&2
    exit 2
  fi
  shapes=(model.preset=distilgpt2 data.seq_len=1024 train.batch_size=32 data.synthetic_docs=2000)
  bench_args=(--steps 10 --warmup 3)
  baseline=both
  gen_args=(--reps 3)
  tag=$("$py" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_').lower())")
fi
common=(configs/distilgpt2_arxiv.yaml model.init_from= model.dtype=bfloat16 data.source=synthetic
        "data.shards_dir=$work/shards" "train.run_dir=$work/run" train.steps=100 train.progress=false
        "${shapes[@]}")

bench() {  # NAME BASELINE OVERRIDES...
  local name=$1 base=$2
  shift 2
  echo "== $name (at ${SECONDS}s)" >&2
  "$py" -m flax_gpt.cli bench "${common[@]}" "$@" "${bench_args[@]}" --baseline "$base" \
    --out "$out/gpu_check_${name}_$tag.json" > /dev/null
}

bench main "$baseline" model.attention=xla model.pad_vocab_to=128
if [[ $smoke == 1 ]]; then
  echo "== attention_cudnn: skipped on CPU (cuDNN attention needs an NVIDIA GPU)" >&2
else
  bench attention_cudnn none model.attention=cudnn model.pad_vocab_to=128
fi
bench pad_vocab_0 none model.attention=xla model.pad_vocab_to=0

echo "== generate (at ${SECONDS}s)" >&2
"$py" benchmarks/generate.py "${gen_args[@]}" --out "$out/gpu_check_generate_$tag.json" > /dev/null

"$py" - "$out" "$tag" "$SECONDS" <<'EOF'
import json, sys
from pathlib import Path

out, tag = Path(sys.argv[1]), sys.argv[2]
def load(name):
    p = out / f"gpu_check_{name}_{tag}.json"
    return json.loads(p.read_text()) if p.exists() else None

main, cudnn, pad0, gen = (load(n) for n in ("main", "attention_cudnn", "pad_vocab_0", "generate"))
base = main["baseline"] or {}
runs = base.get("runs", {})
tps = lambda r: r and r["tokens_per_sec"]
summary = {
    "device_kind": main["device_kind"], "config": main["config"], "kernels": main["kernels"],
    "kernels_in_ab": {"attention_cudnn": cudnn["kernels"]["attention"] if cudnn else "skipped (CPU)"},
    "ours": {"tokens_per_sec": main["tokens_per_sec"], "mfu": main["mfu"], "compile_time_s": main["compile_time_s"]},
    "pytorch_eager_tokens_per_sec": tps(runs.get("eager")),
    "torch_compile_tokens_per_sec": tps(runs.get("compile")),
    "ratio_to_eager": base.get("ratio"), "ratio_to_best_pytorch": base.get("ratio_to_best"),
    "ab": {"attention_xla_tokens_per_sec": main["tokens_per_sec"],
           "attention_cudnn_tokens_per_sec": tps(cudnn) if cudnn else "skipped (CPU)",
           "pad_vocab_128_tokens_per_sec": main["tokens_per_sec"], "pad_vocab_0_tokens_per_sec": tps(pad0)},
    "generate": [{"batch": r["batch"], "jax_new_tokens_per_s": r["jax"]["new_tokens_per_s"],
                  "transformers_new_tokens_per_s": r["transformers"]["new_tokens_per_s"], "speedup": r["speedup"]}
                 for r in gen["runs"]],
    "targets": {"mfu": ">= 0.40 (H100/H200, distilgpt2 T=1024 bf16)", "ratio_to_eager": ">= 1.5"},
}
if main["mfu"] is not None:
    summary["targets_met"] = {"mfu": main["mfu"] >= 0.40,
                              "ratio_to_eager": base.get("ratio") is not None and base["ratio"] >= 1.5}
summary["wall_s"] = int(sys.argv[3])
(out / f"gpu_check_summary_{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
echo "== done in ${SECONDS}s; JSON in $out" >&2
