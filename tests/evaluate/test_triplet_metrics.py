import unicodedata

import pytest

from glmtune.evaluate.triplet import TripletScores, format_report, parse_triplets, score

APPLE = ("苹果公司", "国籍", "美国")
TECH = ("苹果公司", "行业", "科技")


@pytest.mark.parametrize("text, expected", [
    # the canonical form the generator writes
    ("(苹果公司, 国籍, 美国)", [APPLE]),
    ("(苹果公司, 国籍, 美国)\n(苹果公司, 行业, 科技)", [APPLE, TECH]),
    # full-width parentheses and commas, enumeration comma, no spaces
    ("（苹果公司，国籍，美国）", [APPLE]),
    ("(苹果公司、国籍、美国)", [APPLE]),
    ("(苹果公司,国籍,美国)", [APPLE]),
    # stray whitespace around parts and between triplets
    ("  ( 苹果公司 ,国籍,   美国 )  ", [APPLE]),
    ("(苹果公司, 国籍, 美国)\n\n\n(苹果公司, 行业, 科技)\n", [APPLE, TECH]),
    ("(苹果公司, 国籍, 美国) \t (苹果公司, 行业, 科技)", [APPLE, TECH]),
    # nothing between triplets, widths mixed
    ("(苹果公司, 国籍, 美国)（苹果公司，行业，科技）", [APPLE, TECH]),
    # duplicates (also across widths) collapse, first occurrence wins the order
    ("(苹果公司, 行业, 科技)\n(苹果公司, 国籍, 美国)\n（苹果公司，行业，科技）", [TECH, APPLE]),
    ("(苹果公司, 国籍, 美国)(苹果公司, 国籍, 美国)", [APPLE]),
    # chatter around the triplets is ignored
    ("三元组如下：(苹果公司, 国籍, 美国)。", [APPLE]),
    # internal runs of whitespace become one space, so English names compare
    ("(Steve  Jobs, 国籍,\u3000美国)", [("Steve Jobs", "国籍", "美国")]),
    # explicit "none" answers
    ("无", []),
    ("", []),
    ("  无 \n", []),
    ("无。", []),
    # malformed fragments are dropped, well-formed neighbours kept
    ("我不知道", []),
    ("(苹果公司, 国籍)", []),
    ("(苹果公司, 国籍, 美国, 科技)", []),
    ("(苹果公司, , 美国)", []),
    ("(苹果公司, 国籍, 美国", []),
    ("(苹果公司, 国籍, 美国)\n(oops)\n(苹果公司, 行业", [APPLE]),
])
def test_parse_triplets(text, expected):
    assert parse_triplets(text) == expected


def test_micro_scores_on_hand_computed_case():
    predictions = [
        "(A, 国籍, B)",                      # 1: gold also has (A,行业,C)
        "(D, 首都, E)\n(D, 首都, F)",          # 2: one extra
        "无",                                 # 3: both empty
        "无",                                 # 4: gold (G,作者,H) missed
        "(X, 国籍, Y)",                      # 5: gold is 无
        "（A，国籍，B）",                       # 6: full width, correct
        "(K, 出生地, L)",                     # 7: gold also has (K,毕业院校,M)
    ]
    references = [
        "(A, 国籍, B)\n(A, 行业, C)",
        "(D, 首都, E)",
        "无",
        "(G, 作者, H)",
        "无",
        "(A, 国籍, B)",
        "(K, 出生地, L)\n(K, 毕业院校, M)",
    ]
    # tp: ex1 国籍, ex2 首都, ex6 国籍, ex7 出生地            = 4
    # fp: ex2 (D,首都,F), ex5 (X,国籍,Y)                     = 2
    # fn: ex1 行业, ex4 作者, ex7 毕业院校                      = 3
    # P = 4/6, R = 4/7, F1 = 2*4 / (2*4 + 2 + 3) = 8/13
    # exact match: ex3 and ex6 → 2/7
    s = score(predictions, references)
    assert isinstance(s, TripletScores)
    assert s.n == 7
    assert s.precision == pytest.approx(4 / 6)
    assert s.recall == pytest.approx(4 / 7)
    assert s.f1 == pytest.approx(8 / 13)
    assert s.exact_match == pytest.approx(2 / 7)

    # Per relation (support = gold count):
    #   国籍     tp2 fp1 fn0 → P 2/3, R 1, F1 0.8
    #   首都     tp1 fp1 fn0 → P 1/2, R 1, F1 2/3
    #   出生地   tp1 fp0 fn0 → 1, 1, 1
    #   行业, 作者, 毕业院校: tp0 fp0 fn1 → nothing predicted but gold exists → 0, 0, 0
    pr = s.per_relation
    assert pr["国籍"] == {"tp": 2, "fp": 1, "fn": 0, "support": 2,
                          "precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8)}
    assert pr["首都"]["precision"] == pytest.approx(0.5)
    assert pr["首都"]["f1"] == pytest.approx(2 / 3)
    assert (pr["出生地"]["precision"], pr["出生地"]["recall"], pr["出生地"]["f1"]) == (1.0, 1.0, 1.0)
    for relation in ("行业", "作者", "毕业院校"):
        assert pr[relation] == {"tp": 0, "fp": 0, "fn": 1, "support": 1,
                                "precision": 0.0, "recall": 0.0, "f1": 0.0}
    # Largest support first, then by name, so reports are stable run to run.
    assert list(pr)[0] == "国籍"
    assert list(pr)[1:] == sorted(r for r in pr if r != "国籍")


def test_all_empty_is_perfect():
    # No triplets anywhere: nothing was missed and nothing was invented.
    s = score(["无", ""], ["无", "无"])
    assert (s.precision, s.recall, s.f1, s.exact_match) == (1.0, 1.0, 1.0, 1.0)
    assert s.per_relation == {}


def test_nothing_predicted_but_gold_exists():
    s = score(["无", "垃圾输出"], ["(A, r, B)", "(C, r, D)"])
    assert (s.precision, s.recall, s.f1, s.exact_match) == (0.0, 0.0, 0.0, 0.0)


def test_predictions_without_gold():
    # 1 fp, 0 tp, 0 fn: P = 0/1; the one example is not a match.
    s = score(["(A, r, B)"], ["无"])
    assert (s.precision, s.f1, s.exact_match) == (0.0, 0.0, 0.0)
    assert s.per_relation["r"]["support"] == 0


def test_duplicates_and_order_do_not_matter():
    # Sets per example: a repeated or reordered triplet is neither fp nor a mismatch.
    s = score(["(A, r2, C)\n(A, r, B)\n(A, r, B)"], ["(A, r, B)\n(A, r2, C)"])
    assert (s.precision, s.recall, s.exact_match) == (1.0, 1.0, 1.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score(["无"], [])


def _display_width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_format_report_has_totals_and_aligned_relation_rows():
    s = score(["(A, 国籍, B)\n(D, 首都, E)", "无"],
              ["(A, 国籍, B)\n(A, 毕业院校, C)", "(D, 首都, E)"])
    report = format_report(s, title="val")
    lines = report.splitlines()
    assert lines[0] == "val"
    assert "examples     2" in report
    # ex1: tp (A,国籍,B), fp (D,首都,E) (gold only in ex2), fn (A,毕业院校,C)
    # ex2: fn (D,首都,E) → tp 1, fp 1, fn 2 → P 1/2, R 1/3
    assert "precision    0.5000" in report
    assert "recall       0.3333" in report
    rows = [line for line in lines if line.split(" ")[0] in s.per_relation]
    assert [row.split()[0] for row in rows] == list(s.per_relation)
    header = next(line for line in lines if line.startswith("relation"))
    # CJK names are double width; columns must still line up in a terminal.
    assert {_display_width(row) for row in rows} == {_display_width(header)}
    assert format_report(score([], []))  # no rows, still a report
