"""`flax-gpt` verbs: parse arguments, call the library, print. No logic of its own.

User errors (ConfigError, DataError, HFError, CheckpointError) end in one
line `error: ...` on stderr and exit status 2; a training failure (TrainError) exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _config(args):
    from flax_gpt.config import load_config

    return load_config(args.config, args.overrides)


def _maybe_distributed(args) -> None:
    """Join a multi-process run: explicit flags, or JAX's auto-detection (Cloud TPU, SLURM...)."""
    if not (args.distributed or args.coordinator):
        return
    import jax

    if args.coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()


def cmd_prepare(args) -> int:
    from flax_gpt.data import describe_stats, prepare_shards

    cfg = _config(args)
    manifest = prepare_shards(cfg.data, overwrite=args.overwrite, verify=args.verify)
    print(describe_stats(manifest))
    return 0


def cmd_train(args) -> int:
    _maybe_distributed(args)
    from flax_gpt.pipeline import train

    result = train(_config(args), overwrite_data=args.overwrite_data)
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from flax_gpt.pipeline import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, step=args.step)))
    return 0


def cmd_import_hf(args) -> int:
    from flax_gpt.run import import_hf_to_run

    cfg, n = import_hf_to_run(args.src, args.out)
    print(f"imported {args.src} ({n:,} parameters, {cfg.model.n_layer} layers) into {args.out} as step 0")
    return 0


def cmd_export(args) -> int:
    from flax_gpt.pipeline import export_run

    out, diff = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported to {out}; transformers reloads it and its logits match ours (max diff {diff:.2e})")
    if args.push_to_hub:
        from flax_gpt.publish import push_to_hub

        url = push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)
        print(f"pushed to {url}")
    return 0


def cmd_generate(args) -> int:
    from flax_gpt.generate import generate_cli

    return generate_cli(args)


def cmd_bench(args) -> int:
    from flax_gpt.bench import run_bench

    result = run_bench(_config(args), steps=args.steps, warmup=args.warmup, baseline=args.baseline, out=args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_report(args) -> int:
    from flax_gpt.report import write_report

    path = write_report(args.run_dir, samples=args.samples, max_new_tokens=args.max_new_tokens)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flax-gpt", description="Train, evaluate, sample and export GPT-2 models in JAX.")
    sub = p.add_subparsers(dest="verb", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
        sp.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=20")

    sp = sub.add_parser("prepare", help="tokenize text into packed shards + manifest.json")
    with_config(sp)
    sp.add_argument("--overwrite", action="store_true", help="replace shards made from different inputs")
    sp.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    sp.set_defaults(fn=cmd_prepare)

    sp = sub.add_parser("train", help="train (resumes from the run directory's latest checkpoint)")
    with_config(sp)
    sp.add_argument("--overwrite-data", action="store_true", help="re-prepare shards whose inputs changed")
    sp.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    sp.add_argument("--coordinator", help="host:port of process 0 for a multi-process run")
    sp.add_argument("--num-processes", type=int)
    sp.add_argument("--process-id", type=int)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint (one JSON object)")
    sp.add_argument("run_dir")
    sp.add_argument("--step", help="N, 'latest' (default) or 'best'")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("import-hf", help="HF model folder or Hub id -> run directory with a step-0 checkpoint")
    sp.add_argument("src")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_import_hf)

    sp = sub.add_parser("export", help="run directory -> transformers GPT2LMHeadModel folder (checked on reload)")
    sp.add_argument("run_dir")
    sp.add_argument("--out", required=True)
    sp.add_argument("--step", help="N, 'latest' (default) or 'best'")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--push-to-hub", metavar="REPO_ID")
    sp.add_argument("--private", action="store_true")
    sp.add_argument("--revision", help="branch to push to")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("generate", help="sample text from a run directory or an HF folder")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("run_dir", nargs="?")
    src.add_argument("--hf", metavar="HF_DIR")
    sp.add_argument("--step")
    sp.add_argument("--prompt", action="append", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--num-samples", type=int, default=1)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--greedy", action="store_true")
    sp.add_argument("--backend", choices=("jax", "transformers"), default="jax")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_generate)

    sp = sub.add_parser("bench", help="training throughput (tokens/s, MFU) vs the PyTorch baseline")
    with_config(sp)
    sp.add_argument("--steps", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--baseline", choices=("none", "eager", "compile", "both"), default="eager")
    sp.add_argument("--out", help="JSON path (default benchmarks/results/train_<preset>_<device>.json)")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("report", help="plots, word clouds and an index.html in RUN_DIR/report/")
    sp.add_argument("run_dir")
    sp.add_argument("--samples", type=int, default=10)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.set_defaults(fn=cmd_report)
    return p


def _quiet_libraries() -> None:
    """Orbax and JAX log routine notices through absl at WARNING; users see only ours."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from flax_gpt.checkpoint import CheckpointError
    from flax_gpt.config import ConfigError
    from flax_gpt.data import DataError
    from flax_gpt.hf_io import HFError
    from flax_gpt.trainer import TrainError

    try:
        return args.fn(args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, HFError, CheckpointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
