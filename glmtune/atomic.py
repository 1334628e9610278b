"""Writing files and directories so that a crash never leaves a half-written one behind.

Everything is written into a temporary sibling first and renamed into place:
``os.replace`` within one file system is atomic, so a reader (or a resume) sees
either the old complete version or the new complete one. Every writer in
glmtune goes through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``target``; removed if it is still there afterwards."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    with adopted_dir(tmp):
        yield tmp


@contextmanager
def adopted_dir(path: Path) -> Iterator[Path]:
    """Like ``staging_dir`` for a directory made beforehand: removed unless renamed away."""
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (savefig, …);
    renamed onto ``path`` when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_lines(path, [text])


def write_lines(path: Path, pieces: Iterable[str]) -> None:
    """Write ``pieces`` (joined as given) to ``path`` as UTF-8 with ``\\n`` newlines."""
    with staged_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(pieces)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_files(staged: Path, target: Path, last: str | None = None) -> None:
    """Move every file of ``staged`` into ``target``, the marker file ``last`` at the end.

    Each file is replaced atomically and the marker goes last, so a directory
    whose marker (e.g. ``adapter_config.json``) exists has the files it names.
    """
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staged.iterdir() if p.is_file())
    ordered = [n for n in names if n != last] + ([last] if last in names else [])
    for name in ordered:
        with open(staged / name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staged / name, target / name)
    fsync_dir(target)


def replace_dir(staged: Path, out: Path, *, shared: bool = False) -> None:
    """Rename the directory ``staged`` to ``out``; an old ``out`` is moved aside first and
    removed after, and put back if the rename fails.

    ``shared``: give the result the permissions of a normal new directory (mkdtemp makes
    it private), for outputs meant to be used by others, such as an exported model.
    """
    if shared:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o777 & ~umask)
        for path in staged.rglob("*"):
            os.chmod(path, (0o666 if path.is_file() else 0o777) & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # the previous version back, rather than nothing
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
