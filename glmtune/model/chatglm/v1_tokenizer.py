"""ChatGLM-6B (v1) tokenizer without remote code: ``ice_text.model`` read directly.

THUDM's ``tokenization_chatglm.py`` breaks under transformers >= 4.34. This
class gives the same ids and the same decoded text:

- ids of the SentencePiece pieces are shifted by ``num_image_tokens`` (0 in the
  current THUDM/chatglm-6b, 20000 in its first release); ids below it are the
  ``<image_N>`` tokens;
- before SentencePiece sees the text, newlines become ``<n>``, tabs
  ``<|tab|>`` and runs of 2..80 spaces ``<|blank_N|>``; decoding inverts it;
- ``[gMASK] <sop>`` are appended after the text (a pair: ``a [gMASK] <sop> b <eop>``);
- the special tokens ``<sop> <eop> <unk> <pad> [MASK]`` written in the text are
  cut out as those tokens, with the whitespace around them dropped, and
  decoding cleans up the spaces before punctuation, as THUDM's tokenizer does
  under the transformers (4.33) it was written for.

Padding goes on the left by default, as THUDM's does; the model builds its
2-D positions and attention mask from the ids and an ordinary 0/1 attention
mask, so padding on either side works.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from glmtune.errors import GlmtuneError
from glmtune.model.files import read_json_object

VOCAB_FILE = "ice_text.model"
TAB = "<|tab|>"
_IMAGE = re.compile(r"<image_(\d+)>")


def _blank(n: int) -> str:
    return f"<|blank_{n}|>"


class ChatGLM1Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, num_image_tokens: int = 20000, max_blank_length: int = 80,
                 do_lower_case: bool = False, remove_space: bool = False,
                 bos_token: str = "<sop>", eos_token: str = "<eop>", end_token: str = "</s>",
                 mask_token: str = "[MASK]", gmask_token: str = "[gMASK]",
                 pad_token: str = "<pad>", unk_token: str = "<unk>", padding_side: str = "left",
                 clean_up_tokenization_spaces: bool = True, **kwargs: Any) -> None:
        import sentencepiece as spm

        # The base class asks for the vocabulary while it initializes: load it first.
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = int(max_blank_length)
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        for key in ("auto_map", "tokenizer_class", "name_or_path"):
            kwargs.pop(key, None)
        super().__init__(bos_token=bos_token, eos_token=eos_token, mask_token=mask_token,
                         pad_token=pad_token, unk_token=unk_token, padding_side=padding_side,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         num_image_tokens=self.num_image_tokens, do_lower_case=do_lower_case,
                         remove_space=remove_space, end_token=end_token, gmask_token=gmask_token,
                         **kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, **overrides: Any) -> ChatGLM1Tokenizer:
        """The tokenizer of a THUDM/chatglm-6b style directory (ice_text.model +
        tokenizer_config.json); the config's remote-code entries are ignored."""
        path = Path(model_dir)
        vocab = path / VOCAB_FILE
        if not vocab.is_file():
            raise GlmtuneError(f"{path}: no {VOCAB_FILE}; a ChatGLM-6B directory needs its "
                               "SentencePiece model next to config.json")
        config_file = path / "tokenizer_config.json"
        settings = (read_json_object(config_file, "tokenizer config") if config_file.is_file()
                    else {})
        keys = ("num_image_tokens", "max_blank_length", "do_lower_case", "remove_space",
                "bos_token", "eos_token", "end_token", "mask_token", "gmask_token", "pad_token",
                "unk_token", "padding_side", "model_max_length")
        kwargs = {k: settings[k] for k in keys if k in settings} | overrides
        # THUDM's constructor default, used when tokenizer_config.json does not say.
        kwargs.setdefault("num_image_tokens", 20000)
        try:
            return cls(str(vocab), **kwargs)
        except (OSError, RuntimeError) as exc:
            raise GlmtuneError(f"{vocab}: not a SentencePiece model ({exc})") from exc

    # --- vocabulary --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        image = _IMAGE.fullmatch(token)
        if image:
            return int(image.group(1))
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    # --- text -> tokens ----------------------------------------------------

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", TAB)
        for n in range(self.max_blank_length, 1, -1):
            text = text.replace(" " * n, _blank(n))
        return text

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(self._preprocess(text), out_type=str)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if kwargs.pop("split_special_tokens", False):
            return self._tokenize(text)
        specials = sorted({t for t in (self.bos_token, self.eos_token, self.unk_token,
                                       self.pad_token, self.mask_token) if t}, key=len, reverse=True)
        parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
        # Odd parts are special tokens; the text next to them loses its adjacent whitespace.
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                tokens.append(part)
            elif part:
                tokens += self._tokenize(part)
        return tokens

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.gmask_token_id}
            return [int(i in special) for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int],
                                             token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- tokens -> text ----------------------------------------------------

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace(TAB, "\t")
        for n in range(2, self.max_blank_length + 1):
            text = text.replace(_blank(n), " " * n)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._postprocess(self.sp.decode_pieces(list(tokens)))

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        drop = {self.pad_token_id} | (set(self.all_special_ids) if skip_special_tokens else set())
        text = self.convert_tokens_to_string([self._convert_id_to_token(int(i)) for i in ids
                                              if int(i) not in drop])
        clean = (self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None
                 else clean_up_tokenization_spaces)
        return self.clean_up_tokenization(text) if clean else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        target = Path(save_directory) / name if Path(save_directory).is_dir() else Path(save_directory)
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)
