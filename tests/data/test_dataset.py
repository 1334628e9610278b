"""Batch order and padding: what the training loop is fed."""

from __future__ import annotations

import random

from glmtune.data import dataset


def _lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 200) for _ in range(n)]


def _padding_fraction(order, lengths, batch):
    padded = real = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start:start + batch]]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / padded


def test_grouped_order_is_a_seeded_permutation_with_less_padding():
    lengths = _lengths()
    grouped = dataset.epoch_order(lengths, seed=1, epoch=0, step_rows=16, group_by_length=True)
    plain = dataset.epoch_order(lengths, seed=1, epoch=0, step_rows=16, group_by_length=False)
    assert sorted(grouped) == list(range(len(lengths)))
    assert grouped == dataset.epoch_order(lengths, seed=1, epoch=0, step_rows=16, group_by_length=True)
    assert grouped != dataset.epoch_order(lengths, seed=1, epoch=1, step_rows=16, group_by_length=True)
    assert _padding_fraction(grouped, lengths, 16) < 0.1 < 0.3 < _padding_fraction(plain, lengths, 16)


def test_steps_are_shuffled_and_the_ragged_step_comes_last():
    lengths = _lengths(n=16 * 40 + 5)
    order = dataset.epoch_order(lengths, seed=3, epoch=0, step_rows=16, group_by_length=True)
    firsts = [lengths[order[s]] for s in range(0, 16 * 40, 16)]
    assert firsts != sorted(firsts, reverse=True)  # not longest-first across the epoch
    assert len(order[16 * 40:]) == 5
    # every full step is one length-sorted run: micro-batches cut from it stay similar
    for s in range(0, 16 * 40, 16):
        step = [lengths[i] for i in order[s:s + 16]]
        assert step == sorted(step, reverse=True)


def test_rows_far_beyond_max_seq_len_are_cut_before_tokenizing(tiny_model, caplog):
    """A hostile 5 MB row never reaches the tokenizer whole (issue 13, failure 6)."""
    from glmtune.data.sample import Message, Sample
    from glmtune.model import load
    from glmtune.model.family import detect_family

    source = load.resolve(str(tiny_model))
    tokenizer = load.load_tokenizer(source, False)
    template = detect_family(source.config, tokenizer, source.path).template
    longest = []
    encode = tokenizer.encode

    def spy(text, *args, **kwargs):
        longest.append(len(text))
        return encode(text, *args, **kwargs)

    tokenizer.encode = spy
    huge = Sample(messages=(Message("user", "问题" * 2_500_000), Message("assistant", "答")))
    normal = Sample(messages=(Message("user", "北京在哪里"), Message("assistant", "中国")))
    plain = Sample(text="字" * 5_000_000)
    cut = dataset.tokenize("d.jsonl", [normal, huge, normal, plain], "prompt_response",
                           tokenizer, template, max_len=64)
    limit = 64 * dataset.MAX_CHARS_PER_TOKEN
    assert max(longest) <= limit + 16  # plus the template's own few characters
    assert "2 rows longer than 2048 characters were cut" in caplog.text and "rows 2, 4" in caplog.text
    # the cut rows are what max_seq_len keeps of them anyway; the normal rows are untouched
    assert cut.rows[0] == cut.rows[1] and len(cut.rows) == 3  # the huge one's answer is dropped
    assert len(cut.rows[2].input_ids) == 64
