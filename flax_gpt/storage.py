"""Locations users give (run dirs, shards, exports, reports) and who owns them.

Owned outputs: every folder flax_gpt writes carries a marker file, `.flax_gpt.json`, saying what
it is (`run`, `shards`, `export`, `report`). A verb writes into a folder only when it is new, empty,
or already of its own kind; it replaces one only when asked (`--overwrite`) and only if it is of
its kind. Folders written before markers existed are recognised by their contents (a run: config.yaml
+ checkpoints/; shards: a flax_gpt manifest.json; an export: config.json + training_config.json).
Anything else is refused, naming what is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from flax_gpt.errors import OutputError

MARKER = ".flax_gpt.json"
KINDS = {"run": "run directory", "shards": "shards folder", "export": "export folder", "report": "report folder"}
TMP_PREFIX = ".flax_gpt-tmp-"  # temporary siblings of an output being written; cleaned on the next run
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(text) -> bool:
    """`owner/name` (a Hugging Face Hub model or dataset id) that is not an existing local path."""
    text = text.strip() if isinstance(text, str) else ""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~")) and not Path(text).exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before a Hub call, so offline users get an error in seconds, not after
    huggingface_hub's minute of retries. True when offline mode is set (the local cache answers)
    or a proxy is configured (we cannot judge reachability through it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _legacy_kind(folder: Path) -> str | None:
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        return "run"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            if "format_version" in json.loads(manifest.read_text(encoding="utf-8")):
                return "shards"
        except (OSError, ValueError):
            return None
    if (folder / "config.json").is_file() and (folder / "training_config.json").is_file():
        return "export"
    return None


def folder_kind(path: str | os.PathLike) -> str | None:
    """The kind of flax_gpt output at `path`, or None (absent, empty, a file, or not ours)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    marker = folder / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind in KINDS:
            return kind
    return _legacy_kind(folder)


def _listing(folder: Path, n: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and next(folder.iterdir(), None) is None


def owner_of(path: str | os.PathLike, kinds=("run", "shards")) -> tuple[Path, str] | None:
    """The nearest folder at or above `path` that is an output of one of `kinds`."""
    p = Path(path).absolute()
    for folder in (p, *p.parents):
        kind = folder_kind(folder)
        if kind in kinds:
            return folder, kind
    return None


def check_output(path: str | os.PathLike, kind: str, *, overwrite: bool = False, flag: str = "--overwrite",
                 reuse: bool = False) -> bool:
    """Refuse to write a `kind` output at `path` unless it is ours to write. Never writes.

    Returns True when `path` already holds an output of this kind (to be replaced, or reused when
    `reuse`). Raises OutputError naming what is there otherwise."""
    folder = Path(path)
    what = KINDS[kind]
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder; choose a folder path for the {what}")
    if kind in ("export", "report"):  # never inside (or equal to) a run directory or shards folder
        inside = owner_of(folder)
        if inside is not None and (kind == "export" or inside[1] == "shards"):
            owner, owner_kind = inside
            where = f"is a {KINDS[owner_kind]}" if owner == folder.absolute() else \
                f"is inside the {KINDS[owner_kind]} {owner}"
            raise OutputError(f"{folder} {where}; write the {what} to a folder of its own")
    if not folder.exists() or is_empty_dir(folder):
        return False
    found = folder_kind(folder)
    if found == kind:
        if not (overwrite or reuse):
            raise OutputError(f"{folder} already holds a {what}; pass {flag} to replace it or choose another folder")
        return True
    if found is not None:
        raise OutputError(f"{folder} is a {KINDS[found]}, not a {what}; choose another folder")
    raise OutputError(f"{folder} is not empty and was not written by flax-gpt (holds {_listing(folder)}); "
                      f"choose an empty or new folder for the {what}")


def mark(path: str | os.PathLike, kind: str) -> None:
    """Create `path` if needed and write its marker (idempotent)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if folder_kind(folder) != kind or not marker.is_file():
        write_atomic(marker, json.dumps({"kind": kind, "written_by": "flax_gpt", "created_unix": round(time.time())}))


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh temporary folder beside `path` (same filesystem, so it can be renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


def clean_temp_siblings(path: str | os.PathLike) -> None:
    """Remove temporary folders that an interrupted write of `path` left beside it."""
    out = Path(path)
    if out.parent.is_dir():
        for stale in out.parent.glob(f"{TMP_PREFIX}{out.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place, replacing `out` (already checked to be ours)."""
    if out.exists():
        old = out.parent / f"{TMP_PREFIX}{out.name}-old-{os.getpid()}"
        os.replace(out, old)  # out is briefly absent, never half-written
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail now, not after hours of training, if `path` (or the folder that would hold it) is not
    writable: the nearest existing folder at or above it must accept new files."""
    p = Path(path).absolute()
    existing = next(f for f in (p, *p.parents) if f.exists())
    if not existing.is_dir():
        raise OutputError(f"{existing} is a file, so {what} {p} cannot be created there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {p}: {existing} is not writable; fix its permissions or choose another path")
