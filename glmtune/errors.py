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
