"""Locations users give (sources, shards, run dirs, exports, reports): a local path or any fsspec URL
(`gs://bucket/prefix` on Cloud TPU VMs), all through `etils.epath` (gcsfs underneath for gs://).
And who owns them.

Owned outputs: every folder flax_gpt writes carries a marker file, `.flax_gpt.json`, saying what
it is (`run`, `shards`, `export`, `report`). A verb writes into a folder only when it is new, empty,
or already of its own kind; it replaces one only when asked (`--overwrite`) and only if it is of
its kind. Folders written before markers existed are recognised by their contents (a run: config.yaml
+ checkpoints/; shards: a flax_gpt manifest.json; an export: config.json + training_config.json).
Anything else is refused, naming what is there.

Endpoints: the one setting a user gives to reach a GCS emulator (or another endpoint) is the
standard `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`; it is passed on here, before gcsfs loads,
to every library in its own form (TensorStore under Orbax: `TENSORSTORE_GCS_HTTP_URL`; fsspec's
default token; gcsfs's bucket-type probe, which speaks gRPC to Google and would stall).
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
from urllib.parse import urlparse

from flax_gpt.errors import OutputError, StorageError


def _pass_on_emulator_host() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore: no credential lookup
    os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_pass_on_emulator_host()

from etils import epath  # noqa: E402  (after the endpoint settings: gcsfs reads them when it loads)

MARKER = ".flax_gpt.json"
KINDS = {"run": "run directory", "shards": "shards folder", "export": "export folder", "report": "report folder"}
TMP_PREFIX = ".flax_gpt-tmp-"  # temporary siblings of an output being written; cleaned on the next run
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


# ------------------------------------------------------------------------------------ locations


def is_remote(path) -> bool:
    return bool(_URL.match(str(path)))


def location(path) -> epath.Path:
    """A user's location as an `epath.Path`; local paths made absolute (their meaning is where the
    command ran), URLs left as they are."""
    if isinstance(path, epath.Path) and (is_remote(path) or Path(str(path)).is_absolute()):
        return path
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def connects(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host and port opens within `timeout` seconds."""
    u = urlparse(url if "://" in url else f"http://{url}")
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def check_reachable(path, what: str) -> None:
    """A gs:// location: its endpoint answers and its bucket exists (seconds, not the libraries'
    minutes of retries). Local paths pass."""
    if not is_remote(path) or not str(path).startswith("gs://"):
        return
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com")
    if not connects(endpoint, 5.0):
        raise StorageError(f"{what} {path}: cannot reach Cloud Storage at {endpoint}; check the network "
                           "(or STORAGE_EMULATOR_HOST)")
    bucket = epath.Path("gs://" + str(path)[5:].split("/", 1)[0])
    try:
        found = bucket.exists()
    except OSError as e:
        raise StorageError(f"{what} {path}: {error_reason(e)}; check the bucket name and your access") from None
    if not found:
        raise StorageError(f"{what} {path}: bucket {bucket} does not exist; create it or fix the URL")


def error_reason(e: BaseException) -> str:
    """A short cause: the OS error when there is one (TensorStore reports it as `os_error_code`)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return os.strerror(int(code.group(1)))
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


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
    import fsspec  # noqa: PLC0415 - deferred: only bucket folders need a filesystem object

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


def _legacy_kind(folder: epath.Path) -> str | None:
    if (folder / "config.yaml").exists() and (folder / "checkpoints").is_dir():
        return "run"
    manifest = folder / "manifest.json"
    if manifest.exists():
        try:
            if "format_version" in json.loads(manifest.read_text()):
                return "shards"
        except (OSError, ValueError):
            return None
    if (folder / "config.json").exists() and (folder / "training_config.json").exists():
        return "export"
    return None


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
    return kind if kind in KINDS else _legacy_kind(folder)


def _names(folder: epath.Path) -> list[str]:
    try:
        return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except FileNotFoundError:
        return []


def is_empty_dir(folder) -> bool:
    folder = location(folder)
    return folder.is_dir() and not _names(folder)


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
            where = f"is a {KINDS[owner_kind]}" if owner == folder else f"is inside the {KINDS[owner_kind]} {owner}"
            raise OutputError(f"{shown} {where}; write the {what} to a folder of its own")
    names = _names(folder) if folder.is_dir() else []
    if not names:
        return False
    found = folder_kind(folder)
    if found == kind:
        if not (overwrite or reuse):
            raise OutputError(f"{shown} already holds a {what}; pass {flag} to replace it or choose another folder")
        return True
    if found is not None:
        raise OutputError(f"{shown} is a {KINDS[found]}, not a {what}; choose another folder")
    listing = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise OutputError(f"{shown} is not empty and was not written by flax-gpt (holds {listing}); "
                      f"choose an empty or new folder for the {what}")


def mark(path, kind: str, **info: str) -> None:
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


# ------------------------------------------------------------------------------------ staging


def staging_folder(out) -> Path:
    """A fresh local folder to build an output in before it is put in place: a temporary sibling of
    a local `out` (same filesystem, so it can be renamed into place), or a local temporary folder
    for a bucket location (uploaded when finished)."""
    if is_remote(out):
        return Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    out = Path(os.path.abspath(str(out)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


def clean_temp_siblings(out) -> None:
    """Remove temporary folders that an interrupted write of a local `out` left beside it."""
    if is_remote(out):
        return
    out = Path(os.path.abspath(str(out)))
    if out.parent.is_dir():
        for stale in out.parent.glob(f"{TMP_PREFIX}{out.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def publish_folder(tmp: Path, out) -> None:
    """Put a finished staging folder in place of `out` (already checked to be ours to replace)."""
    if is_remote(out):
        rmtree(out)
        upload_folder(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    out = Path(os.path.abspath(str(out)))
    if out.exists():
        old = out.parent / f"{TMP_PREFIX}{out.name}-old-{os.getpid()}"
        os.replace(out, old)  # out is briefly absent, never half-written
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
