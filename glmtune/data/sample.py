"""The one in-memory shape every data format is read into."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Sample:
    """One training example.

    Either a conversation (``messages``: optional system, then user/assistant
    turns ending with an assistant turn; only assistant text is trained) or a
    plain text (``text``: every token is trained).
    """

    messages: tuple[Message, ...] = ()
    text: str | None = None

    @property
    def is_plain(self) -> bool:
        return self.text is not None
