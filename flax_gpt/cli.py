"""`flax-gpt` verbs: parse arguments, call the library, print. No logic of its own.

The one error boundary (`main`): every failure a user can cause ends in one line `error: ...` on
stderr naming the problem and the fix, exit status 2 (a training failure, `TrainError`, exits 1):
our errors, the OSError family (permission, not-a-directory, exists, no space left), argument
errors, and XLA running out of memory (what ran out and what to change). A genuine bug keeps its
traceback; `--debug` or FLAX_GPT_DEBUG=1 shows it for the rest too.
SIGTERM or Ctrl-C before training starts stops with one line; during training they checkpoint.
How the process around a verb behaves (quiet libraries, signals, the one line) is `process.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys

from flax_gpt import process
from flax_gpt.config_files import config_yaml, explain, load_config
from flax_gpt.errors import ConfigError, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


# jax.random.key keeps 32 bits of a seed without x64 (2**32 samples like 0), and numpy's seed, which
# the transformers backend sets, takes nothing else.
SEED_RANGE = (0, 2**32 - 1)


def _check_args(args) -> None:
    """Numeric flags checked before anything is imported or read: a value that could only be a
    mistake is one line naming the flag and its valid range, never silently used or ignored."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    if hasattr(args, "num_processes"):
        _check_processes(args)
    if args.verb == "generate":
        need(args.max_new_tokens >= 1 and args.num_samples >= 1,
             f"--max-new-tokens and --num-samples must be at least 1 (got {args.max_new_tokens}, {args.num_samples})")
        need(math.isfinite(args.temperature) and args.temperature >= 0,
             f"--temperature must be a finite number >= 0 (got {args.temperature}); 0 means greedy")
        need(math.isfinite(args.top_p) and 0 < args.top_p <= 1, f"--top-p must be in (0, 1] (got {args.top_p})")
        need(args.top_k >= 0, f"--top-k must be >= 0 (got {args.top_k}); 0 means no top-k cut")
        need(SEED_RANGE[0] <= args.seed <= SEED_RANGE[1],
             f"--seed {args.seed} is out of range; use an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (2**32 - 1)")
    elif args.verb == "report":
        need(args.samples >= 0 and args.max_new_tokens >= 1,
             f"--samples must be >= 0 and --max-new-tokens >= 1 (got {args.samples}, {args.max_new_tokens})")
    elif args.verb == "bench":
        need(args.steps >= 1 and args.warmup >= 0,
             f"--steps must be at least 1 and --warmup at least 0 (got {args.steps}, {args.warmup})")
    elif args.verb == "eval":
        need(args.seq_len is None or args.seq_len >= 1, f"--seq-len must be at least 1 (got {args.seq_len})")


def _check_processes(args) -> None:
    """--num-processes N --process-id I: both or neither, 0 <= I < N; train uses them only to join
    a run through --coordinator, and --distributed detects them itself."""
    n, i = args.num_processes, args.process_id
    if n is None and i is None:
        return
    if n is not None and n < 1:
        raise ConfigError(f"--num-processes must be at least 1 (got {n})")
    if n is None or (i is None and n > 1):
        raise ConfigError("--num-processes N and --process-id I go together (this process is I of N, 0 <= I < N)")
    if not 0 <= (i or 0) < n:
        raise ConfigError(f"--process-id {i} must be in [0, --num-processes {n})")
    if args.distributed and not args.coordinator:
        raise ConfigError("--distributed detects the processes itself; drop --num-processes/--process-id, or "
                          "give them with --coordinator HOST:PORT instead of --distributed")
    if args.verb == "train" and not args.coordinator and n > 1:
        raise ConfigError(f"train --num-processes {n} joins a multi-process run: add --coordinator HOST:PORT "
                          "(process 0's address)")


def _config(args):
    return load_config(args.config, args.overrides)


def _maybe_distributed(args) -> None:
    """Join a multi-process run: explicit flags, or JAX's auto-detection (Cloud TPU, SLURM...)."""
    if not (args.distributed or args.coordinator):
        return
    import jax  # deferred, see the verbs below

    if args.coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()


# Each verb imports the library it needs when it runs (deferred: `flax-gpt --help` and argument
# errors stay instant instead of loading jax and transformers first).

def cmd_prepare(args) -> int:
    from flax_gpt.data.prepare import prepare_shards  # deferred, see above
    from flax_gpt.data.stats import describe_stats

    cfg = _config(args)
    n, i = args.num_processes or 1, args.process_id or 0
    if args.distributed or args.coordinator:
        _maybe_distributed(args)
        import jax  # deferred, see above
        from jax.experimental import multihost_utils

        n, i = jax.process_count(), jax.process_index()
    if not 0 <= i < n:
        raise ConfigError(f"--process-id {i} must be in [0, --num-processes {n})")
    manifest = prepare_shards(cfg.data, overwrite=args.overwrite, verify=args.verify, num_processes=n, process_id=i)
    if args.distributed or args.coordinator:  # everyone's units are written: one manifest for all
        multihost_utils.sync_global_devices("flax_gpt.prepare.units")
        manifest = manifest or prepare_shards(cfg.data, verify=args.verify)
    if manifest is not None:
        print(describe_stats(manifest))
    return 0


def cmd_train(args) -> int:
    _maybe_distributed(args)
    from flax_gpt import pipeline  # deferred, see above

    result, _ = pipeline.train(_config(args), overwrite_data=args.overwrite_data, overwrite_export=args.overwrite)
    print(json.dumps(result))
    return 0


def cmd_eval(args) -> int:
    from flax_gpt import pipeline  # deferred, see above

    print(json.dumps(pipeline.evaluate(args.run_dir, hf=args.hf, step=args.step, data=args.data,
                                       text_column=args.text_column, template=args.template, seq_len=args.seq_len,
                                       say=process.progress)))
    return 0


def cmd_import_hf(args) -> int:
    from flax_gpt import pipeline  # deferred, see above

    cfg, n = pipeline.import_hf(args.src, args.out)
    print(f"imported {args.src} ({n:,} parameters, {cfg.model.n_layer} layers) into {args.out} as step 0")
    return 0


def cmd_export(args) -> int:
    from flax_gpt.export.hf_folder import export_run  # deferred, see above
    from flax_gpt.export.hub import push_to_hub

    out, diff = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported to {out}; transformers reloads it and its logits match ours (max diff {diff:.2e})")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)
        print(f"pushed to {url}")
    return 0


def cmd_generate(args) -> int:
    from flax_gpt import pipeline  # deferred, see above
    from flax_gpt.generate import load_model

    prompts = list(args.prompt)
    kw = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    if args.backend == "transformers":
        texts = pipeline.transformers_generate(run_dir=args.run_dir, hf=args.hf, step=args.step, prompts=prompts,
                                               **kw)
    else:
        texts = load_model(run_dir=args.run_dir, hf=args.hf, step=args.step).generate(prompts, **kw)
    for i, text in enumerate(texts):
        prompt, k = prompts[i // args.num_samples], i % args.num_samples
        if args.json:
            print(json.dumps({"prompt": prompt, "sample": k, "text": text}, ensure_ascii=False))
        else:
            head = f"--- {prompt!r}" + (f" (sample {k + 1}/{args.num_samples})" if args.num_samples > 1 else "")
            print(f"{head}\n{text}\n")
    return 0


def cmd_bench(args) -> int:
    from flax_gpt.bench.throughput import run_bench  # deferred, see above

    result = run_bench(_config(args), steps=args.steps, warmup=args.warmup, baseline=args.baseline, out=args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_compile(args) -> int:
    from flax_gpt import storage  # deferred, see above
    from flax_gpt.bench.tpu_compile import compile_for_topology, fit_problem

    cfg = _config(args)
    if args.max_compiles < 1 or (args.time_budget is not None and args.time_budget <= 0):
        raise ConfigError(f"--max-compiles must be at least 1 and --time-budget positive "
                          f"(got {args.max_compiles}, {args.time_budget})")
    if args.out:  # before compiling: never a folder, nor a file of a run, shards folder or export
        storage.check_output_file(args.out, "--out")
    result = compile_for_topology(cfg, args.topology, find_max_batch=args.find_max_batch,
                                  max_compiles=args.max_compiles, time_budget_s=args.time_budget,
                                  say=process.progress)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        storage.write_atomic(args.out, text + "\n")
    if result.get("interrupted"):  # Ctrl-C during the batch search: the JSON holds what was proven
        print(f"interrupted; the largest batch proven to fit so far is {result['max_batch']} (in the JSON)",
              file=sys.stderr)
        return 130
    problem = fit_problem(result)
    if problem:  # the JSON is out; not fitting is still a config the user must change: exit 2
        raise ConfigError(problem)
    return 0


def cmd_report(args) -> int:
    from flax_gpt.report.report import write_report  # deferred, see above

    path = write_report(args.run_dir, samples=args.samples, max_new_tokens=args.max_new_tokens)
    print(f"report written to {path}")
    return 0


def cmd_config(args) -> int:
    cfg = _config(args)
    print(explain(cfg) if args.explain else config_yaml(cfg), end="\n" if args.explain else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flax-gpt", description="Train, evaluate, sample and export GPT-2 models in JAX.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors too")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    def with_config(sp, required=True):
        sp.add_argument("config", nargs=None if required else "?", help="YAML config, e.g. configs/tiny.yaml")
        sp.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=20")

    sp = sub.add_parser("prepare", help="tokenize text into packed shards + manifest.json")
    with_config(sp)
    sp.add_argument("--overwrite", action="store_true", help="replace shards made from different inputs")
    sp.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    sp.add_argument("--num-processes", type=int, help="one job over N processes: each takes every N-th input file")
    sp.add_argument("--process-id", type=int, help="this process's index in [0, N)")
    sp.add_argument("--distributed", action="store_true", help="the same under jax.distributed (auto-detected)")
    sp.add_argument("--coordinator", help="host:port of process 0, for jax.distributed without auto-detection")
    sp.set_defaults(fn=cmd_prepare)

    sp = sub.add_parser("train", help="train (resumes from the run directory's latest checkpoint)")
    with_config(sp)
    sp.add_argument("--overwrite-data", action="store_true", help="re-prepare shards whose inputs changed")
    sp.add_argument("--overwrite", action="store_true", help="replace another run's export in train.export_dir")
    sp.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    sp.add_argument("--coordinator", help="host:port of process 0 for a multi-process run")
    sp.add_argument("--num-processes", type=int)
    sp.add_argument("--process-id", type=int)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("eval", help="loss and perplexity of a checkpoint or HF model on a corpus (one JSON object)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("run_dir", nargs="?")
    src.add_argument("--hf", metavar="HF_DIR", help="an HF GPT-2 folder or Hub id instead of a run")
    sp.add_argument("--step", help="N, 'latest' (default) or 'best'")
    sp.add_argument("--data", metavar="SOURCE", help="evaluate on every document of this source, or on the "
                                                     "validation split of a prepared shards folder (default: the "
                                                     "run's validation split)")
    sp.add_argument("--text-column", help="column holding the text of --data (default: the config's, abstract)")
    sp.add_argument("--template", help='text of --data built from columns, e.g. "{title}\\n{abstract}"')
    sp.add_argument("--seq-len", type=int, help="row length for --data text (default: the run's data.seq_len; "
                                                "HF: n_positions, at most 1024); reported as seq_len")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("import-hf", help="HF model folder or Hub id -> run directory with a step-0 checkpoint")
    sp.add_argument("src")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_import_hf)

    sp = sub.add_parser("export", help="run directory -> transformers model folder (checked on reload)")
    sp.add_argument("run_dir")
    sp.add_argument("--out", required=True)
    sp.add_argument("--step", help="N, 'latest' (default) or 'best'")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    sp.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    sp.add_argument("--push-to-hub", metavar="REPO_ID")
    sp.add_argument("--private", action="store_true")
    sp.add_argument("--revision", help="branch to push to")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("generate", help="sample text from a run directory or an HF folder")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("run_dir", nargs="?")
    src.add_argument("--hf", metavar="HF_DIR")
    sp.add_argument("--step", help="N, 'latest' (default) or 'best'")
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

    sp = sub.add_parser("compile", help="compile the train step for a Cloud TPU slice here: HBM fit, FLOPs, estimates")
    with_config(sp)
    sp.add_argument("--topology", required=True, help="Cloud TPU name (v5e-8, v4-32, v5p-128, v6e-16) or vX:AxB[xC]")
    sp.add_argument("--find-max-batch", action="store_true", help="also search the largest global batch that fits")
    sp.add_argument("--max-compiles", type=int, default=12,
                    help="--find-max-batch: at most this many compiles, the config's own included")
    sp.add_argument("--time-budget", type=float, metavar="S",
                    help="--find-max-batch: start no compile that would end past S seconds of compiling")
    sp.add_argument("--out", help="also write the JSON here")
    sp.set_defaults(fn=cmd_compile)

    sp = sub.add_parser("report", help="plots, word clouds and an index.html in RUN_DIR/report/")
    sp.add_argument("run_dir")
    sp.add_argument("--samples", type=int, default=10)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("config", help="print the resolved config (--explain: every key, its meaning)")
    with_config(sp, required=False)
    sp.add_argument("--explain", action="store_true", help="every key with its value, default, effect and meaning")
    sp.set_defaults(fn=cmd_config)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`section.key=value` overrides may stand anywhere after the verb, flags included
    (`train CONFIG --overwrite-data train.steps=5`): argparse stops filling a positional list at the
    first flag, so the words it leaves over are the config's to check; unknown flags are an error."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("FLAX_GPT_DEBUG", "") not in ("", "0") or "--debug" in (argv or sys.argv[1:])
    signal.signal(signal.SIGTERM, process.terminate)  # the training loop replaces it while it runs
    args = None
    try:
        args = parse_args(argv)
        _check_args(args)
        process.quiet_libraries(debug)
        return args.fn(args)
    except BaseException as e:
        if process.interrupted(e):
            print(f"interrupted; {process.STOPPED}", file=sys.stderr)
            return 130
        e = process.as_user_error(e, getattr(args, "verb", None))  # e.g. XLA out of memory: a config to change
        if debug or not isinstance(e, (UserError, OSError)):
            raise
        print(f"error: {process.one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


def entry() -> None:
    """The `flax-gpt` command. After a failure it leaves at once: our files are closed by then, but
    background threads of XLA (a compile) or Orbax (a failed save) may still run, and tearing the
    runtime down under them crashes or prints their tracebacks on the way out."""
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    entry()
