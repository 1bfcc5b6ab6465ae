"""One run per workdir: an exclusive lock on WORKDIR/.lock for as long as a run uses it.

    with workdir.lock(workdir):          # WorkdirLockedError (naming the holder's pid) if in use
        stage.run(config, workdir)

The lock is `fcntl.flock` on WORKDIR/.lock, which also records the holder (pid, host, command,
start time) for the error message of a second run. The kernel releases a flock when its holder
dies, however it dies, so a lock file left by a killed run never blocks the next one. Take it on
process 0 only in a multi-host run (`enabled=jax.process_index() == 0`): the other hosts of the
same run share the workdir.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Iterator

LOCK_NAME = ".lock"


class WorkdirLockedError(ValueError):
    """Another live process holds the workdir; the message names its pid, host and command."""


def _holder(fd: int) -> dict:
    """The holder record written into the lock file ({} while the holder is still writing it)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def read_holder(path: str | os.PathLike) -> dict:
    """The holder record of WORKDIR/.lock ({} when there is none); for messages and tests."""
    file = pathlib.Path(path) / LOCK_NAME
    if not file.exists():
        return {}
    fd = os.open(file, os.O_RDONLY)
    try:
        return _holder(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock(path: str | os.PathLike, enabled: bool = True) -> Iterator[pathlib.Path]:
    """Holds an exclusive lock on `path` (created if missing) for the body of the `with`.

    Raises WorkdirLockedError at once, without waiting, when another process holds it. Yields the
    lock file's path. `enabled=False` does nothing (hosts other than process 0).
    """
    workdir = pathlib.Path(path)
    file = workdir / LOCK_NAME
    if not enabled:
        yield file
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
                f"{holder.get('command')}"
                if holder
                else "a process that is just starting (no holder recorded yet)"
            )
            raise WorkdirLockedError(
                f"workdir {workdir} is in use by another run ({who}); wait for it to finish or use another workdir"
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield file
        finally:
            os.ftruncate(fd, 0)  # no stale holder record once released
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
