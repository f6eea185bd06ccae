"""One trainer per MODEL_DIR: an exclusive lock on `MODEL_DIR/.lock`, held for the whole run.

The lock is an advisory `flock` on the file, so the kernel drops it when its holder dies in any
way (`kill -9` included): a lock left by a killed run is stale by construction, and the next run
takes it over, saying whose it was. The file itself records the holder (host, pid, start time)
for the message a refused run prints. Process 0 of a multi-host run holds it for all processes.
Object stores (gs://, s3://) have no such locks; runs there are not locked (said at start).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from e2s2_jax.errors import RunLockedError

LOCK_NAME = ".lock"


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


class RunLock:
    """Holds MODEL_DIR's lock from `acquire()` to `release()` (or process exit)."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_NAME)
        self._file = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a line to log when it took over a dead run's lock.

        Raises RunLockedError naming the holder when a live run holds it.
        """
        handle = open(self.path, "a+")  # noqa: SIM115  (held open: closing it drops the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _read_holder(handle.read())
            handle.close()
            raise RunLockedError(
                f"MODEL_DIR {os.path.dirname(self.path)} is in use by another run "
                f"({_describe(holder)}; lock file {self.path}): wait for it to finish or stop "
                "it, or choose another --gin.MODEL_DIR."
            ) from None
        handle.seek(0)
        previous = _read_holder(handle.read())
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        )
        handle.flush()
        self._file = handle
        if previous:
            return f"took over the lock of a run that is no longer running ({_describe(previous)})"
        return None

    def release(self) -> None:
        if self._file is not None:
            # Emptied, not removed: removing would let a third run lock a new file while a second
            # still waits on the old one.
            self._file.seek(0)
            self._file.truncate()
            self._file.close()
            self._file = None


def _read_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
