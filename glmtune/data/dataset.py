"""Samples -> token ids with loss masks -> padded batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from glmtune.data.formats import check_same_format, read_samples
from glmtune.data.sample import Message, Sample
from glmtune.data.templates import IGNORE_INDEX, encode
from glmtune.errors import DataError

log = logging.getLogger(__name__)



@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenizedSet:
    path: str
    format: str
    rows: list[Encoded]
    truncated: int


def load_split(path: str, max_samples: int | None = None,
               encoding: str = "auto") -> tuple[list[Sample], str]:
    samples, fmt = read_samples(path, max_samples=max_samples, encoding=encoding)
    log.info("loaded %d rows from %s (%s format)", len(samples), path, fmt)
    return samples, fmt


# No token of any tokenizer we know covers more characters than this, so a row's first
# max_len tokens lie within its first max_len * MAX_CHARS_PER_TOKEN characters: the rest
# is cut before tokenizing (a 50 MB row once took 9 GB to tokenize, only to be truncated).
MAX_CHARS_PER_TOKEN = 32


def cut_to_chars(sample: Sample, limit: int) -> Sample | None:
    """``sample`` with at most ``limit`` characters of text, in order; None if it fits."""
    if sample.is_plain:
        return Sample(text=sample.text[:limit]) if len(sample.text) > limit else None
    if sum(len(m.content) for m in sample.messages) <= limit:
        return None
    left, messages = limit, []
    for message in sample.messages:  # every turn stays, so the conversation keeps its shape
        messages.append(Message(message.role, message.content[:left]))
        left -= len(messages[-1].content)
    return Sample(messages=tuple(messages))


def tokenize(path: str, samples: list[Sample], fmt: str, tokenizer, template: str,
             max_len: int) -> TokenizedSet:
    rows, truncated, dropped, cut = [], 0, [], []
    limit = max_len * MAX_CHARS_PER_TOKEN
    for index, sample in enumerate(samples, start=1):
        shorter = cut_to_chars(sample, limit)
        if shorter is not None:
            sample = shorter
            cut.append(index)
        ids, labels, was_truncated = encode(template, sample, tokenizer, max_len)
        was_truncated = was_truncated or shorter is not None
        row = Encoded(ids, labels)
        if row.trained_tokens == 0:
            # The answer starts beyond max_len: nothing of it would be trained.
            dropped.append(index)
            continue
        truncated += was_truncated
        rows.append(row)
    if not rows:
        raise DataError(path, f"no row has an answer within the first {max_len} tokens",
                        field="max_seq_len", expected="a larger --max-seq-len or shorter prompts")
    if cut:
        log.warning("%s: %d rows longer than %d characters were cut to that before tokenizing "
                    "(rows %s)", path, len(cut), limit, _first_rows(cut))
    if truncated:
        log.warning("%s: %d of %d rows were longer than --max-seq-len %d and were truncated",
                    path, truncated, len(samples), max_len)
    if dropped:
        log.warning("%s: skipped %d rows whose answer starts after --max-seq-len %d tokens "
                    "(rows %s)", path, len(dropped), max_len, _first_rows(dropped))
    return TokenizedSet(path, fmt, rows, truncated)


def _first_rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")


def load_train_val(train_path: str, val_path: str | None, tokenizer, template: str,
                   max_len: int, max_samples: int | None, max_eval_samples: int | None,
                   encoding: str = "auto") -> tuple[TokenizedSet, TokenizedSet | None]:
    """Read and check both files before tokenizing either, so bad data fails fast."""
    train_samples, train_fmt = load_split(train_path, max_samples, encoding)
    val_samples, val_fmt = (None, None)
    if val_path:
        val_samples, val_fmt = load_split(val_path, max_eval_samples, encoding)
        check_same_format(train_fmt, val_fmt, val_path)
    train = tokenize(train_path, train_samples, train_fmt, tokenizer, template, max_len)
    val = tokenize(val_path, val_samples, val_fmt, tokenizer, template, max_len) if val_path else None
    return train, val


PAD_MULTIPLE = 8
GROUP_WINDOW_STEPS = 16  # length grouping sorts this many optimizer steps' rows at a time


def padded_width(tokens: int) -> int:
    """The width a batch whose longest row has ``tokens`` tokens is padded to (see ``collate``)."""
    return -(-tokens // PAD_MULTIPLE) * PAD_MULTIPLE


def epoch_order(lengths: list[int], *, seed: int, epoch: int, step_rows: int,
                group_by_length: bool) -> list[int]:
    """Row indices in the order epoch ``epoch`` trains them (seeded by seed + epoch).

    With ``group_by_length`` each window of GROUP_WINDOW_STEPS optimizer steps
    (``step_rows`` rows each) is sorted by length and cut into steps, and the
    steps are shuffled: rows batched together have similar lengths, so little of
    a batch is padding. Steps, not micro-batches, are the unit, so a resume with
    a smaller micro-batch (same effective batch) still sees the same rows.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return order
    window = step_rows * GROUP_WINDOW_STEPS
    steps = []
    for start in range(0, len(order), window):
        by_length = sorted(order[start:start + window], key=lambda i: -lengths[i])
        steps += [by_length[i:i + step_rows] for i in range(0, len(by_length), step_rows)]
    ragged = steps.pop() if steps and len(steps[-1]) < step_rows else []  # stays last: keeps alignment
    shuffled = torch.randperm(len(steps), generator=generator).tolist()
    return [i for s in shuffled for i in steps[s]] + ragged


def _blank_batch(count: int, longest: int, pad_id: int):
    """(input ids all padding, labels all ignored) for ``count`` sequences of ``longest``
    tokens rounded up to a multiple of PAD_MULTIPLE (see ``collate``)."""
    import torch

    width = padded_width(longest)
    return (torch.full((count, width), pad_id, dtype=torch.long),
            torch.full((count, width), IGNORE_INDEX, dtype=torch.long))


def collate(rows: list[Encoded], pad_id: int):
    """Right-pad a batch to its longest row, rounded up to a multiple of 8.

    Padding is masked from attention and loss. The rounding keeps the number
    of distinct tensor shapes small: oneDNN and autocast cache per shape, and
    on CPU every new sequence length otherwise costs memory that is never
    given back.
    """
    import torch

    ids, labels = _blank_batch(len(rows), max(len(r.input_ids) for r in rows), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(sequences: list[list[Encoded]], pad_id: int):
    """Several rows per sequence, each attending only to itself (``packing``).

    Position ids restart at every row; with no attention mask, transformers
    reads the restarts as row boundaries and masks attention across them. The
    first label of each row is not trained: it would be predicted from the end
    of the row before. The padding at the end counts as one more row, trained
    on nothing. ``attention_mask`` marks real tokens for counting only.
    """
    import torch

    ids, labels = _blank_batch(len(sequences),
                               max(sum(len(r.input_ids) for r in rows) for rows in sequences),
                               pad_id)
    width = ids.shape[1]
    positions = torch.zeros_like(ids)
    real = torch.zeros_like(ids)
    for i, rows in enumerate(sequences):
        at = 0
        for row in rows:
            n = len(row.input_ids)
            ids[i, at:at + n] = torch.tensor(row.input_ids)
            labels[i, at + 1:at + n] = torch.tensor(row.labels[1:])
            positions[i, at:at + n] = torch.arange(n)
            at += n
        real[i, :at] = 1
        positions[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": real}
