"""Which rows each micro-batch holds (epoch order, packing, each process's slice, resume
position), and the micro-batches themselves.

The data position is the number of rows all processes have consumed
(``rows_seen``). Everything here is a pure function of it and of the settings,
so a resumed run, even one with another micro-batch size, sees exactly the rows
the interrupted one would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from glmtune.data.dataset import (
    IGNORE_INDEX,
    Encoded,
    collate,
    collate_packed,
    epoch_order,
    padded_width,
)


def pack(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows in ``order``, cut into runs whose lengths add up to at most ``capacity``.

    Next-fit, not a tighter bin packing: every run is a contiguous stretch of
    the order, so a position counted in rows always falls between two runs and
    a resume rebuilds the same runs from there.
    """
    runs: list[list[int]] = []
    used = capacity  # forces a new run for the first row
    for index in order:
        if used + lengths[index] > capacity:
            runs.append([])
            used = 0
        runs[-1].append(index)
        used += lengths[index]
    return runs


@dataclass(frozen=True)
class Sampler:
    lengths: list[int]            # tokens of each training row
    seed: int
    micro_batch: int              # sequences per process per forward pass
    grad_accum: int
    world: int = 1
    rank: int = 0
    group_by_length: bool = False
    pack_len: int | None = None   # pack rows into sequences of at most this many tokens

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world

    def epoch_units(self, epoch: int) -> list[list[int]]:
        """The epoch's sequences, each a list of row indices (one row each without packing)."""
        order = epoch_order(self.lengths, seed=self.seed, epoch=epoch,
                            step_rows=self.global_batch * self.grad_accum,
                            group_by_length=self.group_by_length)
        if self.pack_len is None:
            return [[i] for i in order]
        return pack(order, self.lengths, self.pack_len)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch (the first one's, when packing makes them differ)."""
        micro_batches = math.ceil(len(self.epoch_units(0)) / self.global_batch)
        return max(1, math.ceil(micro_batches / self.grad_accum))

    def mean_batch_shape(self) -> tuple[float, float]:
        """(tokens, sequence length) of this process's average padded micro-batch in the
        first epoch: what a step computes, for predicting its time."""
        units = self.epoch_units(0)
        widths = [padded_width(sum(self.lengths[i] for i in unit)) for unit in units]
        tokens, count = 0, 0
        for first in range(0, len(units), self.global_batch):
            chunk = widths[first:first + self.global_batch]
            per_rank = -(-len(chunk) // self.world)
            mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
            tokens += max(mine, default=0) * len(mine)
            count += 1
        return tokens / max(count, 1), sum(widths) / max(len(widths), 1)

    def micro_batches(self, rows_seen: int) -> Iterator[tuple[list[list[int]], int]]:
        """Endless (this process's sequences, rows all processes consume) from ``rows_seen``.

        At an epoch's ragged end a process may get no sequence; the caller then
        runs a fully masked one, which keeps it in step with the others'
        gradient all-reduce.
        """
        epoch, offset = divmod(rows_seen, len(self.lengths))
        while True:
            units = self.epoch_units(epoch)
            start, consumed = 0, 0
            while consumed < offset:  # a position between two sequences (see pack)
                consumed += len(units[start])
                start += 1
            for first in range(start, len(units), self.global_batch):
                chunk = units[first:first + self.global_batch]
                per_rank = -(-len(chunk) // self.world)
                yield (chunk[self.rank * per_rank:(self.rank + 1) * per_rank],
                       sum(len(unit) for unit in chunk))
            epoch, offset = epoch + 1, 0


def batches(sampler: Sampler, rows: list[Encoded], pad_id: int, rows_seen: int
            ) -> Iterator[tuple[dict, int]]:
    """Endless (collated micro-batch, rows all processes consume) from ``rows_seen`` on."""
    for units, consumed in sampler.micro_batches(rows_seen):
        if not units:  # this process's share of a ragged end: one row that trains nothing
            idle = Encoded(rows[0].input_ids, [IGNORE_INDEX] * len(rows[0].input_ids))
            yield collate([idle], pad_id), consumed
        elif sampler.pack_len is not None:
            yield collate_packed([[rows[i] for i in unit] for unit in units], pad_id), consumed
        else:
            yield collate([rows[unit[0]] for unit in units], pad_id), consumed
