"""The run lock: one process at a time writes a run directory's checkpoints.

A local run directory: the writer holds `RUN_DIR/.flax_gpt.lock` locked with `fcntl.flock`. The
kernel releases such a lock when its holder ends, however it ends (kill -9, a crash, a lost
machine), so a lock left behind by a dead process is free by construction and the next run takes
it over; no age or pid guess is needed. The file records the holder's pid and host, for the one
line a second process is refused with. The holder removes the file when it lets go; after a kill
the file stays, unlocked, and counts as no content of the folder (`storage.LOCK_FILE`).

A gs:// run directory: a bucket has no lock that dies with its holder (an object written as a lock
outlives a kill -9 and could only be judged stale by guessing). The lock is then a local file in the
cache (`FLAX_GPT_CACHE`), keyed by the URL: it stops a second training of the same bucket run
directory on this host, and cannot see processes on other hosts. Run one training per bucket run
directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from flax_gpt import storage
from flax_gpt.errors import OutputError

# A probe (`check_free`) holds the lock for an instant; an acquirer retries this long before it
# concludes that a real holder has it.
_RETRY_S = 1.0
_POLL_S = 0.05


def lock_path(run_dir) -> Path:
    """The lock file of a run directory: inside a local one; in the local cache for a bucket one."""
    if storage.is_remote(run_dir):
        key = hashlib.sha256(str(storage.location(run_dir)).encode()).hexdigest()[:32]
        return storage.cache_dir("locks") / f"{key}.lock"
    return Path(os.path.abspath(str(run_dir))) / storage.LOCK_FILE


class RunLock:
    """Held from `acquire()` to `release()` (or until the process ends)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self._file = None
        self._created: list[Path] = []  # folders the lock file needed (deepest first): removed when empty

    def acquire(self) -> RunLock:
        p = self.path.parent
        while not p.exists():
            self._created.append(p)
            p = p.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _RETRY_S
        while True:
            try:
                f = open(self.path, "a+", encoding="utf-8")  # held until release()
            except PermissionError as e:  # a lock file another user left
                raise OutputError(f"run directory {self.run_dir}: cannot open its lock file {self.path} "
                                  f"({storage.error_reason(e)}); fix its permissions") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    f.close()
                    time.sleep(_POLL_S)
                    continue
                holder = _holder(f)
                f.close()
                self._remove_created()
                raise OutputError(_in_use(self.run_dir, holder)) from None
            if _is_current(f, self.path):
                break
            f.close()  # the previous holder removed this file as it let go: lock the one now there
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": storage.HOST, "since_unix": round(time.time())}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: see _is_current
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self._remove_created()

    def _remove_created(self) -> None:
        for p in self._created:
            try:
                p.rmdir()
            except OSError:  # not empty (the run wrote into it), or gone: kept as it is
                break
        self._created = []


def check_free(run_dir) -> None:
    """Refuse at once, writing nothing, when another process holds the run's lock."""
    try:
        f = open(lock_path(run_dir), encoding="utf-8")  # closed below
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # none, or not ours to probe: acquire says
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(_in_use(run_dir, _holder(f))) from None
        fcntl.flock(f, fcntl.LOCK_UN)


def _is_current(f, path: Path) -> bool:
    """Whether the locked open file is still the one at `path` (not one removed meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _holder(f) -> dict:
    """The holder's record; it writes it just after locking, so an empty file is read again briefly."""
    deadline = time.monotonic() + _RETRY_S
    while True:
        f.seek(0)
        try:
            record = json.loads(f.read() or "null")
        except ValueError:
            record = None
        if isinstance(record, dict) or time.monotonic() > deadline:
            return record if isinstance(record, dict) else {}
        time.sleep(_POLL_S)


def _in_use(run_dir, holder: dict) -> str:
    who = f"process {holder['pid']} on host {holder.get('host', '?')}" if "pid" in holder else "another process"
    since = f" since {time.strftime('%Y-%m-%d %H:%M', time.localtime(holder['since_unix']))}" \
        if "since_unix" in holder else ""
    return (f"run directory {run_dir} is in use by {who}{since}; wait for it to finish or stop it, "
            "or set another train.run_dir")
