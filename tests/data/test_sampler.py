"""What each process trains on, step by step, and where a resume picks up."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from glmtune.data.sampler import Sampler, pack


def _lengths(n=203, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 120) for _ in range(n)]


def _rows(sampler, rows_seen, micro_batches):
    """The row indices of the next ``micro_batches`` micro-batches, and the rows consumed."""
    taken = list(itertools.islice(sampler.micro_batches(rows_seen), micro_batches))
    return [[i for unit in units for i in unit] for units, _ in taken], sum(n for _, n in taken)


def test_packing_puts_every_row_of_a_micro_batch_in_as_few_sequences_as_fit():
    lengths = _lengths(16)
    sequences = pack(lengths, capacity=256)
    assert sorted(p for seq in sequences for p in seq) == list(range(16))
    assert all(sum(lengths[p] for p in seq) <= 256 for seq in sequences)
    # no two sequences could have been one
    totals = sorted(sum(lengths[p] for p in seq) for seq in sequences)
    assert totals[0] + totals[1] > 256
    assert len(sequences) <= math.ceil(sum(lengths) / 256) + 1


def test_a_row_longer_than_the_capacity_is_a_sequence_of_its_own():
    assert sorted(pack([10, 300, 10], capacity=256)) == [[0, 2], [1]]


@pytest.mark.parametrize("pack_len", [None, 256])
def test_every_row_once_per_epoch_and_epochs_differ(pack_len):
    lengths = _lengths()
    sampler = Sampler(lengths, seed=3, micro_batch=4, grad_accum=2, pack_len=pack_len)
    per_epoch = len(sampler.epoch_units(0))
    first, consumed = _rows(sampler, 0, -(-per_epoch // 4))
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))
    assert consumed == len(lengths)
    second, _ = _rows(sampler, len(lengths), 3)
    assert second != first[:3]


@pytest.mark.parametrize("pack_len", [None, 256])
def test_resume_sees_what_the_uninterrupted_run_would_have_seen(pack_len):
    lengths = _lengths()
    sampler = Sampler(lengths, seed=5, micro_batch=4, grad_accum=4, pack_len=pack_len)
    whole, _ = _rows(sampler, 0, 60)  # into the second epoch
    head, consumed = _rows(sampler, 0, 23)
    tail, _ = _rows(sampler, consumed, 37)
    assert head + tail == whole


def test_a_resume_with_another_micro_batch_keeps_the_order_of_rows():
    """16 x 1 interrupted, resumed as 4 x 4 (what auto-shrink does): the same rows in order."""
    lengths = _lengths()
    big = Sampler(lengths, seed=5, micro_batch=16, grad_accum=1, group_by_length=True)
    small = Sampler(lengths, seed=5, micro_batch=4, grad_accum=4, group_by_length=True)
    done, consumed = _rows(big, 0, 5)
    rest_big, _ = _rows(big, consumed, 4)
    rest_small, _ = _rows(small, consumed, 16)
    assert [i for b in rest_small for i in b] == [i for b in rest_big for i in b]
    assert consumed == 80 and len(done) == 5


def test_processes_split_each_micro_batch_without_overlap():
    lengths = _lengths(n=49)
    ranks = [Sampler(lengths, seed=1, micro_batch=3, grad_accum=1, world=2, rank=r) for r in (0, 1)]
    batches = [list(itertools.islice(s.micro_batches(0), 9)) for s in ranks]
    seen = [i for per_rank in batches for units, _ in per_rank for unit in units for i in unit]
    assert sorted(seen) == list(range(49))  # 8 full global batches of 6 and a ragged one of 1
    assert [len(units) for units, _ in batches[1]][-1] == 0  # rank 1 idles at the ragged end
    assert [n for _, n in batches[0]] == [6] * 8 + [1]


def test_packing_trains_the_same_rows_in_the_same_steps():
    """Rows are packed within their micro-batch: the step count, each step's rows and the
    resume position are the unpacked run's."""
    lengths = _lengths()
    plain = Sampler(lengths, seed=0, micro_batch=8, grad_accum=2)
    packed = Sampler(lengths, seed=0, micro_batch=8, grad_accum=2, pack_len=256)
    assert plain.steps_per_epoch() == packed.steps_per_epoch() == math.ceil(math.ceil(203 / 8) / 2)
    assert _rows(plain, 40, 30) == _rows(packed, 40, 30)
    units, _ = next(packed.micro_batches(0))
    sequences = packed.sequences(units)
    assert sorted(i for seq in sequences for i in seq) == sorted(i for unit in units for i in unit)
    assert len(sequences) < len(units)


@pytest.mark.parametrize("pack_len, world", [(None, 1), (256, 1), (None, 2)])
def test_mean_batch_shape_is_what_the_collated_batches_hold(pack_len, world):
    """The time prediction reads the padded size of an average micro-batch from here: it must
    equal what collate actually builds (padding to the longest row, a multiple of 8)."""
    from glmtune.data.dataset import Encoded
    from glmtune.data.sampler import batches

    lengths = _lengths(61)
    rows = [Encoded(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]
    sampler = Sampler(lengths, seed=3, micro_batch=4, grad_accum=1, world=world, rank=0,
                      pack_len=pack_len)
    epoch_batches = math.ceil(len(sampler.epoch_units(0)) / sampler.global_batch)
    shapes = [batch["input_ids"].shape
              for batch, _ in itertools.islice(batches(sampler, rows, 0, 0), epoch_batches)]
    tokens, width = sampler.mean_batch_shape()
    assert tokens == pytest.approx(sum(b * w for b, w in shapes) / len(shapes))
    if world == 1:  # every sequence's own padded length, averaged
        widths = [-(-int(mask.sum()) // 8) * 8 for batch, _ in
                  itertools.islice(batches(sampler, rows, 0, 0), epoch_batches)
                  for mask in batch["attention_mask"]]
        assert width == pytest.approx(sum(widths) / len(widths))
