"""Where things are: a user's location is a local path or any fsspec URL (`gs://bucket/prefix` on
Cloud TPU VMs), all through `etils.epath` (gcsfs underneath for gs://), and how a bucket is reached.

Endpoints: the one setting a user gives to reach a GCS emulator (or another endpoint) is the
standard `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`; it is passed on here, before gcsfs loads,
to every library in its own form (TensorStore under Orbax: `TENSORSTORE_GCS_HTTP_URL`; fsspec's
default token; gcsfs's bucket-type probe, which speaks gRPC to Google and would stall).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from flax_gpt.errors import StorageError


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

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


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
