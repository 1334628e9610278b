"""Token lookups shared by the prompt formats (data) and family detection (model)."""

from __future__ import annotations


def token_id(tokenizer, name: str) -> int | None:
    """The id of token ``name`` if the tokenizer really knows it, else None.

    ``convert_tokens_to_ids`` answers the unk id (or None) for unknown tokens;
    ChatGLM2/3's SentencePiece tokenizers keep their specials behind ``get_command``.
    """
    try:
        tid = tokenizer.convert_tokens_to_ids(name)
    except Exception:  # remote-code tokenizers raise all sorts of things for unknown tokens
        tid = None
    if isinstance(tid, int) and tid >= 0:
        unk_id = getattr(tokenizer, "unk_token_id", None)
        if tid != unk_id or name == getattr(tokenizer, "unk_token", None):
            return tid
    get_command = getattr(tokenizer, "get_command", None)
    if callable(get_command):
        try:
            tid = get_command(name)
        except Exception:  # ChatGLM2's get_command asserts on unknown names
            tid = None
        if isinstance(tid, int) and tid >= 0:
            return tid
    return None
