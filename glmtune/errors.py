"""Errors caused by what the user handed us.

They are reported as one clear message and exit code 2, without a traceback
(``--debug`` shows it): a user can fix them, a stack trace would only hide the
message.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class GlmtuneError(Exception):
    """A problem with the user's input or environment that they can fix."""

    exit_code = EXIT_USER_ERROR


class ConfigError(GlmtuneError):
    """Every problem found in a configuration, reported together."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


class DataError(GlmtuneError):
    """A data file that cannot be used, located as precisely as we can."""

    def __init__(self, file, problem: str, *, line: int | None = None,
                 field: str | None = None, expected: str | None = None):
        self.file, self.line, self.field, self.expected = str(file), line, field, expected
        where = self.file if line is None else f"{self.file}:{line}"
        text = f"{where}: "
        if field is not None:
            text += f"field '{field}': "
        text += problem
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)


EXCERPT_CHARS = 80


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """``repr`` of a value cut to ``limit`` characters: a hostile 10 MB value must not
    become a 10 MB error message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 3]}... ({len(text)} characters)"


def describe_load_failure(exc: BaseException) -> str | None:
    """What is wrong with a file a loader refused, in words; None if ``exc`` says nothing
    about the file (a bug, which should keep its traceback)."""
    import errno
    import json
    import pickle

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError):
        return ("refused: the pickle holds Python objects other than tensors, which could run "
                "code on loading (nothing was executed)")
    if isinstance(exc, EOFError):
        return "is empty or cut short"
    if isinstance(exc, RecursionError):
        return "is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    if type(exc).__name__ == "SafetensorError":
        return f"damaged safetensors file ({excerpt(first)})"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device"
    if isinstance(exc, FileNotFoundError):
        return "is missing"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or excerpt(first)})"
    if isinstance(exc, RuntimeError) and any(
            s in text for s in ("PytorchStreamReader", "zip archive", "inline_container")):
        return "is not a complete PyTorch file (damaged or cut short)"
    return None


class reading:  # noqa: N801 - used like a function: ``with reading(file, expected):``
    """Turn a loader's failure on ``file`` into "file: what is wrong (expected ...)", exit 2."""

    def __init__(self, file, expected: str):
        self.file, self.expected = file, expected

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, GlmtuneError) or not isinstance(exc, Exception):
            return False
        what = describe_load_failure(exc)
        if what is None:
            return False
        raise GlmtuneError(f"{self.file}: {what} (expected {self.expected})") from exc


def out_of_space(exc: BaseException) -> bool:
    """Whether a failed write ran out of disk (safetensors and torch.save word it their own way)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(exc)
    return "No space left" in text or "Disk quota" in text


class writing:  # noqa: N801 - used like a function: ``with writing(target, kept):``
    """A save that failed for want of disk space (or permission) said so, not as a traceback.

    ``kept`` tells what survived (saves are atomic, so the previous version always does).
    """

    def __init__(self, target, kept: str):
        self.target, self.kept = target, kept

    def __exit__(self, kind, exc, tb):
        import shutil
        from pathlib import Path

        if exc is None or isinstance(exc, GlmtuneError) or not isinstance(exc, Exception):
            return False
        if out_of_space(exc) or (isinstance(exc, RuntimeError) and "inline_container" in str(exc)):
            # torch.save's "[enforce fail at inline_container.cc]" never mentions space:
            # the free space left tells
            place = next((p for p in Path(self.target).absolute().parents if p.exists()), Path("."))
            free = shutil.disk_usage(place).free
            if out_of_space(exc) or free < 64 * 2**20:
                raise GlmtuneError(f"{self.target}: no space left on device while saving "
                                   f"({free / 2**20:.0f} MB free on {place}); {self.kept}. Free "
                                   "some space, then resume with --resume auto") from exc
        if isinstance(exc, PermissionError):
            raise GlmtuneError(f"{self.target}: permission denied while saving; "
                               f"{self.kept}") from exc
        return False

    def __enter__(self):
        return self
