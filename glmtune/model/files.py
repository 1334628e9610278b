"""Reading the small JSON files of a model directory, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError


def read_json_object(file: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in ``file``; ``what`` names it in errors ("model config", ...)."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GlmtuneError(f"{file}: unreadable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise GlmtuneError(f"{file}: expected a JSON object")
    return data
