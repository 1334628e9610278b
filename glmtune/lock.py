"""One writer per output: an exclusive lock beside every directory or file glmtune writes.

Two runs writing the same output would overwrite each other's checkpoints, interleave
their logs and replace each other's result. The lock is a hidden sibling
``.<name>.lock`` (a sibling, because export replaces its whole output directory by a
rename) holding the owner's pid, host and command, and held with ``flock`` while the
owner runs: the kernel drops it when the process dies, however it dies, so a lock left
by a crash is recognised and taken over. The owner deletes the file when it is done; a
process that locked a file which was deleted meanwhile notices (the path no longer leads
to the file it locked) and starts again, so two processes never hold two different files.

Where ``flock`` cannot decide (no fcntl, or a file system shared between machines), the
recorded pid and host do: a live process on this host, or any owner on another host
that did not release, keeps the output busy.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from glmtune.errors import GlmtuneError

try:
    import fcntl
except ImportError:  # Windows: the pid/host record alone decides
    fcntl = None

log = logging.getLogger(__name__)


def lock_path(target: Path) -> Path:
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return False
    return True


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _busy(target: Path, path: Path, holder: dict, *, certain: bool) -> GlmtuneError:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command', '?')}`, "
           f"since {holder.get('started', '?')}")
    text = f"{target}: in use by another glmtune process ({who}); two writers would destroy " \
           "each other's output. Wait for it to finish or choose another output"
    if not certain:
        text += f". If that process no longer runs (a crashed machine), delete {path}"
    return GlmtuneError(text)


@contextmanager
def output_lock(target: str | os.PathLike, command: str | None = None):
    """Hold the exclusive lock of ``target`` for the block; refuse if another process has it."""
    target = Path(os.path.abspath(target))
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(target, path)
    try:
        holder, host = _read(fd), socket.gethostname()
        if holder.get("pid") and holder.get("pid") != os.getpid():
            if holder.get("host") != host or (fcntl is None and _alive(int(holder["pid"]))):
                raise _busy(target, path, holder, certain=False)
            log.warning("%s: taking over the lock of pid %s on %s, which ended without "
                        "releasing it (crashed or killed)", target, holder.get("pid"), host)
        me = {"pid": os.getpid(), "host": host,
              "command": command or " ".join(["glmtune", *sys.argv[1:]])[:200],
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode("utf-8"))
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            path.unlink(missing_ok=True)  # while still locked: see the module docstring
    finally:
        os.close(fd)  # drops the flock


def _open_locked(target: Path, path: Path) -> int:
    """An fd of ``path`` holding its flock; raises if a live process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise GlmtuneError(f"{target}: cannot be written (creating its lock {path}: "
                               f"{exc.strerror or exc}); expected a directory you may write "
                               "to") from exc
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise _busy(target, path, holder, certain=True) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its owner deleted it after we opened it: try the new one
