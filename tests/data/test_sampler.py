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


def test_packing_fills_sequences_in_order_without_splitting_rows():
    lengths = _lengths()
    order = list(range(len(lengths)))
    runs = pack(order, lengths, capacity=256)
    assert [i for run in runs for i in run] == order
    assert all(sum(lengths[i] for i in run) <= 256 for run in runs)
    # next-fit: a run ends only when the next row would not fit
    assert all(sum(lengths[i] for i in run) + lengths[after[0]] > 256
               for run, after in zip(runs, runs[1:]))
    assert len(runs) < len(order) / 2


def test_a_row_longer_than_the_capacity_is_a_sequence_of_its_own():
    assert pack([0, 1, 2], [10, 300, 10], capacity=256) == [[0], [1], [2]]


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


def test_steps_per_epoch_counts_packed_sequences():
    lengths = _lengths()
    plain = Sampler(lengths, seed=0, micro_batch=4, grad_accum=2)
    packed = Sampler(lengths, seed=0, micro_batch=4, grad_accum=2, pack_len=256)
    assert plain.steps_per_epoch() == math.ceil(math.ceil(len(lengths) / 4) / 2)
    assert packed.steps_per_epoch() < plain.steps_per_epoch() / 2


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
    assert width == pytest.approx(
        sum(-(-sum(lengths[i] for i in unit) // 8) * 8 for unit in sampler.epoch_units(0))
        / len(sampler.epoch_units(0)))
