"""One run per output_dir: an advisory lock held for the whole run.

The lock is an ``flock`` on a file named after the output_dir's real path, in the machine's
temporary folder (not in output_dir: a run refused for bad input leaves output_dir untouched).
The kernel drops the lock when its process dies, so the lock of a killed run is never stale.
It guards runs on one machine; runs on several machines into one shared folder are not seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from typing import IO

from .config import ConfigError


def lock_path(output_dir: str) -> str:
    real = os.path.realpath(output_dir)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), "fmtune-locks", f"{digest}.lock")


def acquire(output_dir: str) -> IO[str]:
    """Hold the lock of ``output_dir`` (returns the open lock file; :func:`release` it) or
    raise ConfigError naming the PID of the run that holds it."""
    path = lock_path(output_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"output_dir {output_dir} is in use by another fmtune run ({holder}); "
                          "wait for it, or give this run another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    return handle


def release(handle: IO[str] | None) -> None:
    if handle is not None and not handle.closed:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
