"""Files and folders at the locations users give (sources, shards, run dirs, exports, reports; see
`locations`): atomic writes, copies to and from buckets, and who owns each output.

Owned outputs: every folder flax_gpt writes carries a marker file, `.flax_gpt.json`, saying what
it is (`run`, `shards`, `export`, `report`); the marker is written before (or, for a staged folder,
atomically with) the first file. The marker is the only proof: a folder that merely looks like
ours (a manifest.json, a config.yaml beside checkpoints/) is someone else's. A verb writes into a
folder only when it is new, empty, or already of its own kind; it replaces one only when asked
(`--overwrite`), only if it is of its kind, and only if it holds nothing but the files the marker
lists (an export): a folder the user has since put other things into is refused, naming them.
Anything else is refused, naming what is there.

Staging folders are named after their writer (pid@host), so the cleanup of one write removes its
own leftovers and those of writers that are gone, never the live staging folder of another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from flax_gpt.errors import OutputError, StorageError

# Re-exported: callers reach everything about a user's location through storage. (epath comes
# from there too: it must load after the endpoint settings that module makes.)
from flax_gpt.locations import (  # noqa: F401
    check_reachable,
    connects,
    epath,
    error_reason,
    is_remote,
    location,
)

MARKER = ".flax_gpt.json"
LOCK_FILE = ".flax_gpt.lock"  # a run's lock (train/run_lock.py): never content of its own, never foreign
KINDS = {"run": "run directory", "shards": "shards folder", "export": "export folder", "report": "report folder"}
TMP_PREFIX = ".flax_gpt-tmp-"  # temporary siblings of an output being written; cleaned on the next run
# What follows `TMP_PREFIX + name` in a staging folder's name: -PID-(NANOSECONDS|old)[@HOST]. The
# pattern is anchored, so the staging folder of `a-b` never passes for one of `a`.
_TMP_SUFFIX = re.compile(r"-(\d+)-(\d+|old)(?:@([^@/]+))?")
HOST = socket.gethostname()


# ------------------------------------------------------------------------------------ files


def write_atomic(path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a part. (An object
    upload to a bucket is atomic by itself.)"""
    data = data.encode() if isinstance(data, str) else bytes(data)
    if is_remote(path):
        epath.Path(str(path)).write_bytes(data)
        return
    path = Path(str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(e: BaseException) -> OSError | None:
    """The operating system's error behind a failed write: `e` itself, or the one a writer in Rust
    (safetensors, tokenizers) reports only as text, "... No space left on device (os error 28)"."""
    if isinstance(e, OSError):
        return e
    m = _RUST_OS_ERROR.search(str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def rmtree(path) -> None:
    p = location(path)
    if p.exists():
        p.rmtree()


def move(src, dst) -> None:
    """Rename a file or folder (a bucket has no rename: copied, then deleted)."""
    if is_remote(src):
        fs, _ = _fs(src)
        fs.mv(str(src), str(dst), recursive=True)
    else:
        os.replace(str(src), str(dst))


def _fs(url: str):
    import fsspec  # deferred: only bucket folders need a filesystem object

    return fsspec.core.url_to_fs(str(url))


def upload_folder(local: Path, remote) -> None:
    """Copy a local folder's files to a remote prefix, the marker last (so an interrupted upload
    is never taken for a finished output)."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == MARKER)
    for f in files:
        (location(remote) / str(f.relative_to(local))).write_bytes(f.read_bytes())


def files_under(folder) -> list[epath.Path]:
    """Every file below a folder or prefix, sorted (a bucket: one listing, not one per level)."""
    if is_remote(folder):
        fs, root = _fs(str(folder))
        scheme = str(folder).split("://", 1)[0]
        return sorted(epath.Path(f"{scheme}://{p}") for p in fs.find(root))
    return sorted(epath.Path(str(p)) for p in Path(str(folder)).rglob("*") if p.is_file())


def download_folder(remote, local: Path) -> Path:
    """Copy a remote prefix's files into a local folder."""
    fs, root = _fs(str(remote))
    for obj in fs.find(root):
        rel = obj[len(root):].lstrip("/")
        dest = Path(local) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(fs.cat_file(obj))
    return Path(local)


def cached_copy(url: str, kind: str, what: str) -> Path:
    """A local copy of a remote folder, kept in the cache under a key of its objects' names, sizes
    and checksums (a changed object gives a new copy)."""
    check_reachable(url, what)
    fs, root = _fs(url)
    try:
        objects = fs.find(root, detail=True)
    except OSError as e:
        raise StorageError(f"{what} {url}: {error_reason(e)}") from None
    if not objects:
        raise StorageError(f"{what} {url} does not exist or is empty; check the URL")
    key = hashlib.sha256(json.dumps(sorted((k, v.get("size"), v.get("crc32c")) for k, v in objects.items()))
                         .encode()).hexdigest()[:32]
    dest = cache_dir(kind) / key
    if not (dest / ".complete").is_file():
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=TMP_PREFIX))
        download_folder(url, tmp)
        (tmp / ".complete").write_text(url)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def cache_dir(kind: str) -> Path:
    """A local cache folder (`FLAX_GPT_CACHE`, else ~/.cache/flax_gpt) for copies of remote things."""
    root = Path(os.environ.get("FLAX_GPT_CACHE") or Path.home() / ".cache" / "flax_gpt")
    out = root / kind
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------ ownership


def marker_of(path) -> dict:
    """What the owner marker of the folder at `path` records ({} when there is none or it is unreadable)."""
    marker = location(path) / MARKER
    try:
        info = json.loads(marker.read_text()) if marker.exists() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def folder_kind(path) -> str | None:
    """The kind of flax_gpt output at `path`, or None (absent, empty, a file, or not ours)."""
    folder = location(path)
    if not folder.is_dir():
        return None
    kind = marker_of(folder).get("kind")
    return kind if kind in KINDS else None


def _names(folder: epath.Path) -> list[str]:
    """What a folder holds, folders with a trailing /; a lock file left by a killed run is no content."""
    try:
        return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != LOCK_FILE)
    except FileNotFoundError:
        return []


def owner_of(path, kinds=("run", "shards")) -> tuple[epath.Path, str] | None:
    """The nearest folder at or above `path` that is an output of one of `kinds`."""
    p = location(path)
    for folder in (p, *p.parents):
        if str(folder) in ("gs:", "gs://", "/"):
            break
        kind = folder_kind(folder)
        if kind in kinds:
            return folder, kind
    return None


def check_output(path, kind: str, *, overwrite: bool = False, flag: str = "--overwrite",
                 reuse: bool = False) -> bool:
    """Refuse to write a `kind` output at `path` unless it is ours to write. Never writes.

    Returns True when `path` already holds an output of this kind (to be replaced, or reused when
    `reuse`). Raises OutputError naming what is there otherwise."""
    folder = location(path)
    shown = path if isinstance(path, str) else str(folder)
    what = KINDS[kind]
    check_reachable(folder, what)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{shown} is a file, not a folder; choose a folder path for the {what}")
    if kind in ("export", "report"):  # never inside (or equal to) a run directory or shards folder
        inside = owner_of(folder)
        if inside is not None and (kind == "export" or inside[1] == "shards"):
            owner, owner_kind = inside
            where = f"is {_a(KINDS[owner_kind])}" if owner == folder else f"is inside the {KINDS[owner_kind]} {owner}"
            raise OutputError(f"{shown} {where}; write the {what} to a folder of its own")
    names = _names(folder) if folder.is_dir() else []
    if not names:
        return False
    found = folder_kind(folder)
    if found == kind:
        info = marker_of(folder)
        others = _not_listed(folder, names, info)
        if others:
            raise OutputError(f"{shown} holds {_a(what)} and also {_listing(others)}, which it did not write; "
                              f"move those out, or choose another folder (nothing was replaced)")
        if not (overwrite or reuse or info.get("incomplete")):  # a half-uploaded output of ours: redone
            raise OutputError(f"{shown} already holds {_a(what)}; pass {flag} to replace it or choose another folder")
        return True
    if found is not None:
        raise OutputError(f"{shown} is {_a(KINDS[found])}, not {_a(what)}; choose another folder")
    raise OutputError(f"{shown} is not empty and was not written by flax-gpt (holds {_listing(names)}); "
                      f"choose an empty or new folder for the {what}")


def _not_listed(folder: epath.Path, names: list[str], info: dict) -> list[str]:
    """Entries of an output that its marker does not list as written by it (only outputs replaced
    whole, exports, list their files), each named with its kind when it is an output of ours."""
    files = info.get("files", _EXPORT_FILES if info.get("kind") == "export" else None)
    if files is None:
        return []
    written = {*files, MARKER}
    return [n + (f" ({_a(KINDS[k])})" if n.endswith("/") and (k := folder_kind(folder / n.rstrip("/"))) else "")
            for n in names if n.rstrip("/") not in written]


# What an export marked before markers listed their files may hold (the model, its card and the
# tokenizer files transformers writes): anything else in it was put there by someone else.
_EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "README.md", "training_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "added_tokens.json", "chat_template.jinja")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def mark(path, kind: str, **info) -> None:
    """Create `path` if needed and write its marker (idempotent); `info` is recorded with the kind
    (an export records the run it came from, so a later run does not replace it unasked)."""
    folder = location(path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists() or folder_kind(folder) != kind:
        write_atomic(marker, json.dumps({"kind": kind, "written_by": "flax_gpt", "created_unix": round(time.time()),
                                         **info}))


def make_readable(folder: Path) -> None:
    """Give a finished local folder's files the modes a plain `open()` would (0644 under the usual
    umask): some writers (safetensors) create theirs private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (folder, *folder.rglob("*")):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def check_writable(path, what: str) -> None:
    """Fail now, not after hours of training, if `path` (or the folder that would hold it) is not
    writable: the nearest existing folder at or above it must accept new files. A bucket location
    must be reachable and its bucket exist."""
    if is_remote(path):
        check_reachable(path, what)
        return
    p = Path(os.path.abspath(str(path)))
    existing = next(f for f in (p, *p.parents) if f.exists())
    if not existing.is_dir():
        raise OutputError(f"{existing} is a file, so {what} {p} cannot be created there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {p}: {existing} is not writable; fix its permissions or choose another path")


def check_output_file(path, what: str) -> None:
    """A single file a verb writes (a benchmark's JSON): never a folder, and never inside an output
    of ours, whose files belong to the verb that wrote them (a run's config.yaml, a shard...)."""
    p = location(path)
    if p.is_dir():
        raise OutputError(f"{what} {path} is a folder; pass a file path, e.g. results.json")
    inside = owner_of(p.parent, kinds=tuple(KINDS))
    if inside is not None:
        raise OutputError(f"{what} {path} is inside the {KINDS[inside[1]]} {inside[0]}; write it outside "
                          "flax-gpt's outputs")
    check_writable(p, what)


# ------------------------------------------------------------------------------------ staging


def staging_folder(out) -> Path:
    """A fresh local folder to build an output in before it is put in place: a temporary sibling of
    a local `out` (same filesystem, so it can be renamed into place) named after this process, or
    a local temporary folder for a bucket location (uploaded when finished)."""
    if is_remote(out):
        return Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    out = Path(os.path.abspath(str(out)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}-{time.time_ns()}@{HOST}"
    tmp.mkdir()
    return tmp


def process_alive(pid: int) -> bool:
    """Whether a process of that id runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_siblings(out) -> None:
    """Remove the temporary folders that interrupted writes of a local `out` left beside it: this
    process's own, and those of processes on this host that are gone. A live writer's folder, and
    one from another host (whose processes cannot be seen from here), are left alone."""
    if is_remote(out):
        return
    out = Path(os.path.abspath(str(out)))
    if not out.parent.is_dir():
        return
    head = f"{TMP_PREFIX}{out.name}"
    for tmp in out.parent.iterdir():
        m = _TMP_SUFFIX.fullmatch(tmp.name[len(head):]) if tmp.name.startswith(head) else None
        if m is None:
            continue
        pid, host = int(m.group(1)), m.group(3) or HOST  # written before names carried the host: this one
        if host == HOST and (pid == os.getpid() or not process_alive(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: Path, out) -> None:
    """Put a finished staging folder in place of `out` (already checked to be ours to replace).

    A bucket has no rename: the old objects are deleted, then the marker goes up first marked
    incomplete and last as it is, so an upload cut short is an output of ours that the next write
    of its kind replaces, never one taken for finished."""
    if is_remote(out):
        rmtree(out)
        info = marker_of(tmp)
        if info:
            write_atomic(location(out) / MARKER, json.dumps({**info, "incomplete": True}))
        upload_folder(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    out = Path(os.path.abspath(str(out)))
    if out.exists():
        old = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}-old@{HOST}"
        os.replace(out, old)  # out is briefly absent, never half-written
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
