import json

import pytest

from glmtune.data import triplets as gen
from glmtune.evaluate.triplet import parse_triplets


@pytest.fixture(scope="module")
def default_rows():
    return gen.generate()


def _sentence(row):
    prefix = gen.INSTRUCTION.format(text="")
    assert row["prompt"].startswith(prefix)
    return row["prompt"][len(prefix):]


def test_same_seed_same_rows_different_seed_different_rows(default_rows):
    assert gen.generate() == default_rows
    assert gen.generate(seed=42) == default_rows
    other = gen.generate(seed=7)
    assert other != default_rows
    # Not just reshuffled: the sentences themselves must change with the seed.
    assert {r["prompt"] for r in other[0]} != {r["prompt"] for r in default_rows[0]}


def test_counts_and_keys(default_rows):
    train, val = default_rows
    assert (len(train), len(val)) == (gen.DEFAULT_TRAIN_ROWS, gen.DEFAULT_VAL_ROWS) == (4000, 100)
    small_train, small_val = gen.generate(n_train=30, n_val=5, seed=3)
    assert (len(small_train), len(small_val)) == (30, 5)
    assert gen.generate(n_train=10, n_val=0)[1] == []
    for row in train + val:
        assert set(row) == {"prompt", "response"}


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_rejects_bad_counts(bad):
    with pytest.raises(ValueError):
        gen.generate(n_train=bad)


def test_no_validation_sentence_is_in_train(default_rows):
    train, val = default_rows
    train_sentences = {_sentence(r) for r in train}
    val_sentences = [_sentence(r) for r in val]
    assert not train_sentences & set(val_sentences)
    # Duplicates inside a split would overweight some facts silently.
    assert len(train_sentences) == len(train)
    assert len(set(val_sentences)) == len(val)


def test_coverage_of_relations_and_entities(default_rows):
    train, val = default_rows
    relations, entities = set(), set()
    for row in train + val:
        for s, r, o in parse_triplets(row["response"]):
            relations.add(r)
            entities.update((s, o))
    assert len(relations) >= 10
    assert relations <= set(gen.RELATIONS)
    assert len(entities) >= 200


def test_no_triplet_rows_are_present_in_both_splits(default_rows):
    train, val = default_rows
    for split in (train, val):
        share = sum(r["response"] == gen.NO_TRIPLET for r in split) / len(split)
        assert 0.07 <= share <= 0.11


def test_responses_round_trip_and_spans_are_literal(default_rows):
    train, val = default_rows
    multi = 0
    for row in train + val:
        text = _sentence(row)
        assert len(text) <= gen.MAX_CHARS
        found = parse_triplets(row["response"])
        if row["response"] == gen.NO_TRIPLET:
            assert found == []
            continue
        assert 1 <= len(found) <= 3
        # Exact format, so training targets and parsed output agree.
        assert row["response"] == gen.format_triplets(found)
        multi += len(found) > 1
        for s, _, o in found:
            assert s in text and o in text, (text, s, o)
    assert multi > 100


def test_demo_sentence_shape_is_covered(default_rows):
    train, _ = default_rows
    hits = []
    for row in train:
        text = _sentence(row)
        found = parse_triplets(row["response"])
        if len(found) >= 2 and found[0][1] == "国籍" and found[1][1] == "行业":
            s, _, country = found[0]
            industry = found[1][2]
            if f"{s}是一家{country}的{industry}公司" in text:
                hits.append(text)
    assert len(hits) >= 20


def test_format_triplets():
    assert gen.format_triplets([]) == "无"
    assert gen.format_triplets([("苹果公司", "国籍", "美国"), ("苹果公司", "行业", "科技")]) == \
        "(苹果公司, 国籍, 美国)\n(苹果公司, 行业, 科技)"


def test_write_produces_jsonl_atomically(tmp_path):
    out = tmp_path / "nested" / "data"
    train_path, val_path = gen.write(out, n_train=40, n_val=10, seed=1)
    assert (train_path.name, val_path.name) == ("train_triplet.jsonl", "val_triplet.jsonl")
    expected = gen.generate(40, 10, seed=1)
    for path, rows in zip((train_path, val_path), expected):
        raw = path.read_bytes().decode("utf-8")
        # ensure_ascii=False: the Chinese is stored as-is, not as \\u escapes.
        assert "\\u" not in raw
        lines = raw.splitlines()
        assert [json.loads(line) for line in lines] == rows
        assert all(set(json.loads(line)) == {"prompt", "response"} for line in lines)
    # Temporary siblings are gone once the files are in place.
    assert sorted(p.name for p in out.iterdir()) == ["train_triplet.jsonl", "val_triplet.jsonl"]


def test_write_failure_leaves_old_file_intact(tmp_path, monkeypatch):
    train_path, _ = gen.write(tmp_path, n_train=5, n_val=1)
    before = train_path.read_bytes()

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    from glmtune import atomic

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        gen.write(tmp_path, n_train=8, n_val=2, seed=9)
    assert train_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_triplet.jsonl", "val_triplet.jsonl"]
