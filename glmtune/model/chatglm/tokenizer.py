"""ChatGLM2-6B / ChatGLM3-6B tokenizer without remote code, with THUDM's token ids.

``tokenizer.model`` is a plain SentencePiece model; THUDM's tokenizer appends its
special tokens after the SentencePiece vocabulary, in this order:
``[MASK] [gMASK] [sMASK] sop eop`` and, for ChatGLM3, ``<|system|> <|user|>
<|assistant|> <|observation|>``. Text is encoded by SentencePiece alone (special
tokens written in the text stay text, as in THUDM's default
``encode_special_tokens=False``); ``tokenizer(text)`` puts ``[gMASK] sop`` in front,
as THUDM's ``build_inputs_with_special_tokens`` does. Unknown, bos and eos pieces
decode to nothing, like THUDM's ``convert_id_to_token``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers.tokenization_python import PythonBackend

from glmtune.errors import GlmtuneError

VOCAB_FILE = "tokenizer.model"
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def specials_for(version: int) -> tuple[str, ...]:
    return SPECIALS + (ROLE_SPECIALS if version == 3 else ())


class ChatGLMTokenizer(PythonBackend):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, chatglm_version: int = 3, **kwargs):
        from sentencepiece import SentencePieceProcessor

        self.vocab_file = str(vocab_file)
        self.chatglm_version = chatglm_version
        self.sp = SentencePieceProcessor(model_file=self.vocab_file)
        n = self.sp.get_piece_size()
        self.special_ids = {name: n + i for i, name in enumerate(specials_for(chatglm_version))}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        # THUDM's pad is the unk id; bos/eos/unk never appear in decoded text.
        self._silent = {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()}
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(unk_token="<unk>", eos_token="</s>", pad_token="<unk>",
                         chatglm_version=chatglm_version, **kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | Path, version: int) -> ChatGLMTokenizer:
        file = Path(model_dir) / VOCAB_FILE
        if not file.is_file():
            raise GlmtuneError(f"{file}: not found; a ChatGLM{version}-6B directory holds its "
                               "SentencePiece tokenizer as tokenizer.model")
        try:
            return cls(str(file), version)
        except (RuntimeError, OSError) as exc:
            raise GlmtuneError(f"{file}: not a SentencePiece model ({exc}); ChatGLM2/3-6B "
                               "ship one (GLM-4's tiktoken tokenizer.model is not supported "
                               "here: use its -hf release)") from exc

    # --- vocabulary ---------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.special_ids)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        vocab.update(self.special_ids)
        return vocab

    def get_command(self, token: str) -> int:
        """THUDM's accessor for special ids (``<bos> <eos> <pad>`` included)."""
        named = {"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id()}
        if token in named:
            return named[token]
        if token not in self.special_ids:
            raise KeyError(f"{token} is not a special token of ChatGLM{self.chatglm_version}")
        return self.special_ids[token]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_names:
            return self.special_names[index]
        if 0 <= index < self.sp.get_piece_size():
            return self.sp.id_to_piece(index)
        return self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces([t for t in tokens if t not in self.special_ids])

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text, run = "", []
        for tid in (int(t) for t in token_ids):
            if tid in self.special_names:
                text += self.sp.decode(run)
                run = []
                if not skip_special_tokens:
                    text += self.special_names[tid]
            elif tid not in self._silent and 0 <= tid < self.sp.get_piece_size():
                run.append(tid)
        return text + self.sp.decode(run)

    # --- model inputs -------------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = [self.special_ids["[gMASK]"], self.special_ids["sop"]] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.sp.eos_id()]
        return ids

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        target = Path(save_directory)
        if target.is_dir():
            target = target / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)
