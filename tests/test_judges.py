"""Judges: built-ins give the expected numbers; a failing item is recorded and skipped,
never scored 0; configs name unknown judges and bad options clearly."""
import math
import sys
import types

import pytest

from prefopt.errors import ConfigError
from prefopt.judges import Judge, judge_all, make_judge


def test_builtin_judges_score_as_documented():
    prompts = ["p"] * 3
    texts = ["I love this, it is wonderful!", "This is terrible and I hate it.", "The box is on the table."]
    vader = judge_all(make_judge("vader"), prompts, texts)
    assert vader.failures == []
    assert vader.scores[0] > 0.5 and vader.scores[1] < -0.5 and vader.scores[2] == 0.0
    assert judge_all(make_judge({"name": "regex", "pattern": r"\bit\b"}), prompts, texts).scores == [1.0, 1.0, 0.0]
    assert judge_all(make_judge({"name": "regex", "pattern": "t", "count": True}), ["p"], ["tat tt"]).scores == [4.0]
    assert judge_all(make_judge({"name": "length", "unit": "words"}), prompts, texts).scores == [6.0, 7.0, 6.0]
    assert judge_all(make_judge({"name": "length", "target": 5}), ["p", "p"], ["abc", "abcdefg"]).scores == [-2.0, -2.0]


def _flaky(prompt, completion):
    if completion == "raise":
        raise RuntimeError("model server down")
    return {"nan": math.nan, "inf": math.inf, "str": "7", "none": None, "bool": True}.get(completion, len(completion))


def test_failures_are_recorded_per_item_and_never_scored(monkeypatch):
    monkeypatch.setitem(sys.modules, "judge_mod", types.SimpleNamespace(flaky=_flaky))
    judge = make_judge({"name": "python", "function": "judge_mod:flaky"})
    items = ["ok", "raise", "nan", "inf", "str", "none", "bool", "fine!"]
    v = judge_all(judge, ["p"] * len(items), items)
    assert v.scores == [2.0, None, None, None, None, None, None, 5.0]
    assert v.ok == [0, 7]
    reasons = dict(v.failures)
    assert reasons[1] == "raised: RuntimeError: model server down"
    assert reasons[2].startswith("not finite") and reasons[3].startswith("not finite")
    assert all(reasons[i].startswith("not a number") for i in (4, 5, 6))
    assert v.failure_counts() == {"raised": 1, "not finite": 2, "not a number": 3}


def test_batched_python_judge_and_a_batch_of_the_wrong_size(monkeypatch):
    mod = types.SimpleNamespace(batch=lambda ps, cs: [len(c) for c in cs], short=lambda ps, cs: [1.0])
    monkeypatch.setitem(sys.modules, "judge_mod2", mod)
    assert judge_all(make_judge({"name": "python", "function": "judge_mod2:batch", "batched": True}),
                     ["a", "b"], ["xy", "xyz"]).scores == [2.0, 3.0]
    # a batch answer of the wrong length: retried item by item (each call then returns one score)
    v = judge_all(make_judge({"name": "python", "function": "judge_mod2:short", "batched": True}),
                  ["a", "b"], ["x", "y"])
    assert v.scores == [1.0, 1.0] and v.failures == []


def test_custom_judge_class_is_one_method():
    class Exclaims(Judge):
        name = "exclaims"

        def score(self, prompts, completions):
            return [c.count("!") for c in completions]

    assert judge_all(Exclaims(), ["p", "p"], ["a!", "b!!"]).scores == [1.0, 2.0]


@pytest.mark.parametrize("spec, message", [
    ({"name": "vadr"}, "unknown judge 'vadr'.*did you mean 'vader'"),
    ({"name": "regex", "pattern": "("}, "invalid pattern"),
    ({"name": "regex"}, "judge regex:.*pattern"),
    ({"name": "length", "unit": "pages"}, "unit must be"),
    ({"name": "python", "function": "nope"}, "module:function"),
    ({"name": "python", "function": "os:not_there"}, "cannot import judge function"),
])
def test_bad_judge_configs_are_clear(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_judge(spec)
