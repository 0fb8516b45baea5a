"""Files written whole or not at all, and one writer per run folder.

- :func:`replaced`: write to a temporary file beside the target and rename it
  onto the target (``os.replace``, atomic on POSIX within a file system), so
  a reader, a crash or a full disk never leaves half a ``run.json``, JSON
  report or plot.
- :class:`RunLock`: an exclusive lock on a run folder (``filelock``, an
  ``flock`` the kernel releases when its process dies), with the holder's
  host and process id beside it, so a second writer gets an error naming the
  holder, and a lock left by a process that is gone is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock

from remat._errors import RematError

__all__ = ["RunLock", "replaced", "write_text"]


@contextlib.contextmanager
def replaced(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that infer a
    format from it still do), renamed onto ``path`` when the block exits
    without an exception and removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """``Path(path).write_text(text)``, whole or not at all (:func:`replaced`)."""
    with replaced(path) as tmp:
        tmp.write_text(text)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """The exclusive lock of a run folder: ``DIR/.lock`` (the ``flock``) and
    ``DIR/.lock.json`` (``host``, ``pid``, ``since``: who holds it).

    Use as a context manager. ``say`` receives the line that says a lock
    left by a process that is gone was taken over.

    Raises (on enter):
      RematError: another live process holds the folder; names its host and
        pid, and when it started.
    """

    def __init__(self, folder: str | os.PathLike[str], say: Callable[[str], Any] = print):
        self.folder, self.say = Path(folder), say
        self._lock = filelock.FileLock(self.folder / ".lock")
        self._holder = self.folder / ".lock.json"

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._holder.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            h = self._read_holder() or {}
            raise RematError(
                f"run folder {str(self.folder)!r} is in use by process {h.get('pid', '?')} on host "
                f"{h.get('host', '?')} (since {h.get('since', '?')}): one run writes a folder at a time; "
                "wait for it to finish, stop it, or choose another --out") from None
        stale = self._read_holder()
        if stale is not None:
            gone = stale.get("host") == socket.gethostname() and not _alive(int(stale.get("pid", 0)))
            self.say(f"took over the lock of {str(self.folder)!r} from process {stale.get('pid')} on host "
                     f"{stale.get('host')} ({'gone' if gone else 'its lock was released'}), since "
                     f"{stale.get('since')}")
        write_text(self._holder, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                             "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        return self

    def __exit__(self, *exc: object) -> None:
        self._holder.unlink(missing_ok=True)
        self._lock.release()
