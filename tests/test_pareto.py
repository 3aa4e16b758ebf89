import pytest

from slimformer.errors import SlimformerError
from slimformer.pareto import Candidate, Constraint, choose, dominates, measurement, pareto_front, parse_budget


def cand(name, **values):
    return Candidate(name=name, measurements={k: measurement(k, v) for k, v in values.items()})


def names(cs):
    return [c.name for c in cs]


def test_one_objective_keeps_only_the_best_and_its_ties():
    cs = [cand("a", latency_ms=3), cand("b", latency_ms=2), cand("c", latency_ms=2), cand("d", latency_ms=5)]
    assert names(pareto_front(cs, ["latency_ms"])) == ["b", "c"]


def test_two_objectives_with_directions():
    cs = [
        cand("fast_bad", latency_ms=1, quality=0.80),
        cand("slow_good", latency_ms=9, quality=0.92),
        cand("mid", latency_ms=4, quality=0.90),
        cand("dominated", latency_ms=5, quality=0.89),  # mid is faster and better
        cand("dup_mid", latency_ms=4, quality=0.90),  # exact duplicate of mid: both stay
    ]
    assert names(pareto_front(cs, ["latency_ms", "quality"])) == ["fast_bad", "slow_good", "mid", "dup_mid"]
    assert dominates(cs[2], cs[3], ["latency_ms", "quality"])
    assert not dominates(cs[2], cs[4], ["latency_ms", "quality"])


def test_three_objectives():
    cs = [
        cand("a", latency_ms=1, size_mb=10, quality=0.9),
        cand("b", latency_ms=2, size_mb=5, quality=0.9),
        cand("c", latency_ms=2, size_mb=10, quality=0.9),  # dominated by a (and by b)
        cand("d", latency_ms=3, size_mb=20, quality=0.95),
    ]
    assert names(pareto_front(cs, ["latency_ms", "size_mb", "quality"])) == ["a", "b", "d"]


def test_candidates_missing_an_objective_are_left_out():
    cs = [cand("a", latency_ms=1), cand("b", latency_ms=2, size_mb=1)]
    assert names(pareto_front(cs, ["latency_ms", "size_mb"])) == ["b"]
    assert pareto_front([], ["latency_ms"]) == []
    with pytest.raises(SlimformerError):
        pareto_front(cs, [])


def test_parse_budget():
    assert parse_budget("accuracy_drop<=1.0") == [Constraint("accuracy_drop", "<=", 1.0)]
    assert parse_budget("accuracy_drop <= 0.5, latency_ms<5 ; size_mb<=10") == [
        Constraint("accuracy_drop", "<=", 0.5), Constraint("latency_ms", "<", 5.0), Constraint("size_mb", "<=", 10.0)]
    assert parse_budget("speedup>=6 and compression>=15")[1] == Constraint("compression", ">=", 15.0)
    assert parse_budget(None) == [] and parse_budget("  ") == []


@pytest.mark.parametrize("text, message", [
    ("accuracy_drop=1", "cannot read budget"),
    ("accuracy_drop<=one", "cannot read budget"),
    ("speed<=3", "unknown budget quantity 'speed'"),
    ("latency_ms<=0", "is impossible"),
    ("accuracy_drop<=-1", "beat the baseline"),
])
def test_budget_errors(text, message):
    with pytest.raises(SlimformerError, match=message):
        parse_budget(text)


def test_choose_best_under_budget():
    cs = [
        cand("base", latency_ms=10, accuracy_drop=0.0, quality=0.91),
        cand("fast_lossy", latency_ms=1, accuracy_drop=3.0, quality=0.88),
        cand("ok", latency_ms=2, accuracy_drop=0.8, quality=0.902),
        cand("ok_tie", latency_ms=2, accuracy_drop=0.5, quality=0.905),
    ]
    budget = parse_budget("accuracy_drop<=1.0")
    assert choose(cs, budget, "latency_ms").name == "ok_tie"  # same latency, better quality wins
    assert choose(cs, parse_budget("accuracy_drop<=0.1"), "latency_ms").name == "base"
    assert choose(cs, parse_budget("accuracy_drop<=0.1,latency_ms<=5"), "latency_ms") is None


def test_choice_treats_objectives_within_the_tolerance_as_ties():
    cs = [
        cand("fastest", latency_ms=6.00, accuracy_drop=1.0, quality=0.884, size_mb=9.9),
        cand("smaller", latency_ms=6.01, accuracy_drop=0.6, quality=0.888, size_mb=7.9),  # 0.2% slower
        cand("small_far", latency_ms=6.50, accuracy_drop=0.0, quality=0.894, size_mb=5.0),  # 8% slower
        cand("same_q", latency_ms=6.10, accuracy_drop=0.6, quality=0.888, size_mb=7.0),  # 1.7% slower, smaller
    ]
    budget = parse_budget("accuracy_drop<=1.0")
    assert choose(cs, budget, "latency_ms").name == "fastest"  # no tolerance: the measured best
    # Within 3%: better quality first (0.888 over 0.884), then smaller size (7.0 over 7.9 MB); 6.50 is out.
    assert choose(cs, budget, "latency_ms", tolerance=0.03).name == "same_q"
    assert choose(cs, budget, "latency_ms", tolerance=0.1).name == "small_far"
    # For an objective to maximise, the tolerance counts below the best.
    tp = [cand("a", throughput=100.0, quality=0.88), cand("b", throughput=98.0, quality=0.89)]
    assert choose(tp, [], "throughput", tolerance=0.03).name == "b"
    assert choose(tp, [], "throughput").name == "a"


def test_candidate_round_trips_through_dict():
    c = Candidate("x", params={"depth": 3}, path="/p", measurements={"latency_ms": measurement("latency_ms", 2.5)})
    assert Candidate.from_dict(c.to_dict()) == c
