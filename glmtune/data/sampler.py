"""Which rows each micro-batch holds (epoch order, each process's slice, resume position,
packing within the micro-batch), and the micro-batches themselves.

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


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of one micro-batch's rows (by ``lengths``) in as few sequences of at most
    ``capacity`` tokens as first-fit decreasing finds; a longer row is a sequence alone.

    Packing stays inside a micro-batch: a step trains the same rows as without it, in
    fewer and fuller sequences, so the run's updates, step count and resume position are
    those of the unpacked run.
    """
    sequences: list[list[int]] = []
    used: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for k, taken in enumerate(used):
            if taken + lengths[position] <= capacity:
                sequences[k].append(position)
                used[k] += lengths[position]
                break
        else:
            sequences.append([position])
            used.append(lengths[position])
    return sequences


@dataclass(frozen=True)
class Sampler:
    lengths: list[int]            # tokens of each training row
    seed: int
    micro_batch: int              # sequences per process per forward pass
    grad_accum: int
    world: int = 1
    rank: int = 0
    group_by_length: bool = False
    pack_len: int | None = None   # pack each micro-batch's rows into sequences this long

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world

    def epoch_units(self, epoch: int) -> list[list[int]]:
        """The epoch's rows in order, each as a one-row list."""
        order = epoch_order(self.lengths, seed=self.seed, epoch=epoch,
                            step_rows=self.global_batch * self.grad_accum,
                            group_by_length=self.group_by_length)
        return [[i] for i in order]

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch."""
        micro_batches = math.ceil(len(self.lengths) / self.global_batch)
        return max(1, math.ceil(micro_batches / self.grad_accum))

    def sequences(self, units: list[list[int]]) -> list[list[int]]:
        """This process's micro-batch as sequences of row indices: one row each, or the rows
        packed (``pack_len``)."""
        if self.pack_len is None:
            return units
        rows = [i for unit in units for i in unit]
        return [[rows[p] for p in seq] for seq in pack([self.lengths[i] for i in rows], self.pack_len)]

    def mean_batch_shape(self) -> tuple[float, float]:
        """(tokens, sequence length) of this process's average padded micro-batch in the
        first epoch, and the mean padded length of every process's sequences: what a step
        computes, for predicting its time."""
        units = self.epoch_units(0)
        tokens, widths, count = 0, [], 0
        for first in range(0, len(units), self.global_batch):
            for rank, share in enumerate(self._shares(units[first:first + self.global_batch])):
                sequences = self.sequences(share)
                lengths = [padded_width(sum(self.lengths[i] for i in seq)) for seq in sequences]
                widths += lengths
                if rank == self.rank:
                    tokens += max(lengths, default=0) * len(lengths)
            count += 1
        return tokens / max(count, 1), sum(widths) / max(len(widths), 1)

    def micro_batches(self, rows_seen: int) -> Iterator[tuple[list[list[int]], int]]:
        """Endless (this process's rows, rows all processes consume) from ``rows_seen``.

        At an epoch's ragged end a process may get no row; the caller then
        runs a fully masked one, which keeps it in step with the others'
        gradient all-reduce.
        """
        epoch, offset = divmod(rows_seen, len(self.lengths))
        while True:
            yield from self._micro_batches_of(offset, self.epoch_units(epoch))
            epoch, offset = epoch + 1, 0

    def _micro_batches_of(self, start: int, units: list[list[int]]
                          ) -> Iterator[tuple[list[list[int]], int]]:
        for first in range(start, len(units), self.global_batch):
            chunk = units[first:first + self.global_batch]
            yield self._shares(chunk)[self.rank], len(chunk)

    def _shares(self, chunk: list[list[int]]) -> list[list[list[int]]]:
        """A global micro-batch split between the processes (the last ones may get less)."""
        per_rank = -(-len(chunk) // self.world)
        return [chunk[rank * per_rank:(rank + 1) * per_rank] for rank in range(self.world)]


def batches(sampler: Sampler, rows: list[Encoded], pad_id: int, rows_seen: int
            ) -> Iterator[tuple[dict, int]]:
    """Endless (collated micro-batch, rows all processes consume) from ``rows_seen`` on."""
    for units, consumed in sampler.micro_batches(rows_seen):
        if not units:  # this process's share of a ragged end: one row that trains nothing
            idle = Encoded(rows[0].input_ids, [IGNORE_INDEX] * len(rows[0].input_ids))
            yield collate([idle], pad_id), consumed
        elif sampler.pack_len is not None:
            yield collate_packed([[rows[i] for i in seq] for seq in sampler.sequences(units)],
                                 pad_id), consumed
        else:
            yield collate([rows[unit[0]] for unit in units], pad_id), consumed
