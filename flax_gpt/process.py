"""The process around a verb: what the libraries may print, how signals stop it, and the one
line a user's error becomes. The CLI's `main` is the only caller of all but `wait_interruptibly`.
"""

from __future__ import annotations

import errno
import glob
import importlib.util
import inspect
import logging
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

from absl import logging as absl_logging

from flax_gpt.errors import ResourceError, UserError

_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the filesystem is read-only; choose another path",
    errno.ENOSPC: "free disk space or choose another path",
    errno.EDQUOT: "free disk space (quota) or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EISDIR: "it is a folder where a file was expected; fix the path",
    errno.EEXIST: "it already exists; remove it or choose another path",
    errno.ENOENT: "it does not exist; fix the path",
}


def quiet_libraries(debug: bool) -> None:
    """Everything the libraries would print besides our lines (all of it shown with --debug)."""
    _quiet_absl(debug)
    _quiet_libtpu_without_tpu(debug)
    _quiet_closed_loops(debug)


def _quiet_absl(debug: bool) -> None:
    """Orbax and JAX log routine notices through absl at WARNING, and failures they also raise
    (a full disk, say) as tracebacks at ERROR; users see only our one line (all of it with --debug)."""
    level = absl_logging.ERROR if debug else absl_logging.FATAL
    absl_logging.set_verbosity(level)
    logging.getLogger("absl").setLevel(logging.ERROR if debug else logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _quiet_libtpu_without_tpu(debug: bool) -> None:
    """libtpu installed (the [tpu] extra, e.g. for `flax-gpt compile`) on a machine without a TPU:
    jax loads it at start-up all the same, and it prints ~6 lines of errors because it cannot tell
    the accelerator type and worker hostnames. Naming both silences it and changes nothing else
    (jax finds no TPU either way; `compile` names the same two). A machine with TPU chips or
    devices is left alone; --debug shows the lines."""
    if debug or ("TPU_LIBRARY_PATH" not in os.environ and importlib.util.find_spec("libtpu") is None):
        return
    from jax._src import hardware_utils  # deferred: imports jax; counts TPU chips without loading libtpu

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] or glob.glob("/dev/accel*") \
            or glob.glob("/dev/vfio/[0-9]*"):
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, UserError):
        where = e.filename if e.filename is not None else ""
        what = e.strerror or " ".join(str(e).split()) or type(e).__name__
        hint = _OS_HINTS.get(e.errno, "check the path")
        return f"{where}: {what}; {hint}" if where else f"{what}; {hint}"
    text = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    return text


def as_user_error(e: BaseException, verb: str | None = None) -> BaseException:
    """A library's failure that the user fixes by changing the config, as our error; else `e`."""
    xla = _xla_error(e)
    if xla is not None and ("RESOURCE_EXHAUSTED" in str(xla) or "Out of memory" in str(xla)):
        return ResourceError(out_of_memory_line(str(xla), verb))
    return e


def _xla_error(e: BaseException) -> BaseException | None:
    """XLA's runtime error behind `e` (itself, or what caused it), by class name: jax need not be loaded."""
    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if any(c.__name__ in ("JaxRuntimeError", "XlaRuntimeError") for c in type(e).__mro__):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return None


# What to change when a verb runs out of memory; training's settings for the verbs that build a train step.
_OOM_FIX = ("use a smaller train.batch_size (raise train.grad_accum to keep the batch: same result, less memory), "
            "model.remat=full, or shard the state over more devices with mesh.fsdp (e.g. mesh.fsdp=-1 mesh.data=1)")
_OOM_FIXES = {
    "generate": "use fewer prompts or --num-samples, a smaller --max-new-tokens, or a machine with more memory",
    "eval": "evaluate on a machine with more memory (the batch is the run's train.eval_batch_size, else "
            "train.batch_size)",
    "export": "export on a machine with more memory",
}
_UNITS = {"BYTES": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA's sizes: G = GiB
_SIZE = r"([\d.]+) ?(bytes|[KMGT])i?B?\b"
_OOM_SIZES = (  # XLA's wordings across platforms -> what we say (sizes in GiB)
    (re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.IGNORECASE), "{0} used of {1} HBM"),
    (re.compile(rf"temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", re.IGNORECASE),
     "temporaries of {0}, {1} of HBM available"),
    (re.compile(rf"allocat\w*(?: request for)? {_SIZE}", re.IGNORECASE), "could not allocate {0}"),
    (re.compile(rf"There are {_SIZE} free", re.IGNORECASE), "{0} free"),
)


def out_of_memory_line(xla: str, verb: str | None = None) -> str:
    """XLA's RESOURCE_EXHAUSTED message (a page, at compile or run time) as one line: which memory
    ran out, the sizes XLA reported, and what to change."""
    said = []
    for pattern, template in _OOM_SIZES:
        if m := pattern.search(xla):
            sizes = [float(m.group(i)) * _UNITS[m.group(i + 1).upper()] for i in range(1, pattern.groups, 2)]
            said.append(template.format(*(f"{b / 2**30:.2f} GiB" for b in sizes)))
    if not said:  # an unknown wording: XLA's own first sentence
        said = [" ".join(xla.split("RESOURCE_EXHAUSTED:", 1)[-1].split())[:160].split(". ")[0]]
    return f"out of memory: {_which_memory(xla)} ran out ({'; '.join(said)}); {_OOM_FIXES.get(verb, _OOM_FIX)}"


def _which_memory(xla: str) -> str:
    if "hbm" in xla.lower():
        return "TPU HBM"
    try:
        platform = sys.modules["jax"].default_backend() if "jax" in sys.modules else ""
    except Exception:  # noqa: BLE001 - the backend that failed may not answer either
        platform = ""
    return {"cpu": "host memory", "gpu": "GPU memory", "tpu": "TPU HBM"}.get(platform, "device memory")


STOPPED = "what was already written is complete; rerun the same command to continue"


def _quiet_closed_loops(debug: bool) -> None:
    """Echoes of a failure our one line already names, reported through sys.unraisablehook as
    tracebacks or as warnings; dropped (shown with --debug):
    - when a disk fills up during a checkpoint write, TensorStore still completes the other pending
      writes and reports each to Orbax's event loop, which has closed;
    - when one array of a damaged checkpoint does not read back, Orbax abandons the reads of the
      others: each read in flight turns its closing into an error of its own, and a read that had
      failed too may be reported again once nobody waits for it ("Encountered error while reading
      array index"), each printed with the whole TensorStore specification (~60 lines per array);
      a read abandoned before it started is collected unstarted, which Python reports as a
      RuntimeWarning ("coroutine ... was never awaited"), and a failed one nobody awaited is logged
      by asyncio ("Future exception was never retrieved"). flax_gpt itself runs no coroutines."""
    if debug:
        return
    # Bound now: a report can come while the interpreter shuts down, when module globals are gone.
    iscoroutine, read_error = inspect.iscoroutine, ORBAX_READ_ERROR

    def echo(u) -> bool:
        e = u.exc_value
        return ((type(e) is RuntimeError and str(e) == "Event loop is closed")
                or (iscoroutine(u.object) and isinstance(getattr(e, "__cause__", None), GeneratorExit))
                or str(e).startswith(read_error))

    default = sys.unraisablehook  # how TensorStore's callback threads and collected coroutines report them

    def hook(u) -> None:
        if not echo(u):
            default(u)

    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    # asyncio logs a failed read that nobody awaits once it is collected
    logging.getLogger("asyncio").addFilter(lambda r: "exception was never retrieved" not in r.getMessage())


ORBAX_READ_ERROR = "Encountered error while reading array index"  # how Orbax words a failed array read


def terminate(_signum, _frame):
    """SIGTERM outside the training loop (which checkpoints instead) stops at once, wherever it lands.
    Every verb's writes are atomic or resumable, as after kill -9; an exception raised here instead
    could land inside a library's import or an `except` that swallows it."""
    os.write(2, f"terminated (SIGTERM); {STOPPED}\n".encode())
    os._exit(143)


def interrupted(e: BaseException) -> bool:
    """Whether Ctrl-C is behind an exception: one that lands while an extension module initializes
    reaches us as that import's ImportError, caused by it."""
    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return False


def progress(line: str) -> None:
    """A progress line of a long verb, on stderr and flushed at once: stdout keeps the verb's result."""
    print(line, file=sys.stderr, flush=True)


def wait_interruptibly(fn, *args, **kwargs):
    """fn(*args, **kwargs), run in a worker thread while the main thread waits for it.

    An XLA compile holds the main thread inside C++ for minutes, and Python signal handlers run
    only between bytecodes of the main thread: SIGTERM or Ctrl-C would wait for the compile to
    end. A main thread waiting on a thread runs them at once. Ctrl-C's KeyboardInterrupt reaches
    the caller; the worker is left to finish in the background (the process is about to exit)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="flax_gpt-compile")
    try:
        return pool.submit(fn, *args, **kwargs).result()
    finally:
        pool.shutdown(wait=False)
