"""The parent-side judge: splitting asserts into probes, strict decoding, trusted evaluation."""

from __future__ import annotations

import ast
import collections
import decimal
import fractions
import itertools
import json
import math

import pytest

from sgalm_jax.evaluation import _sandbox_child as child
from sgalm_jax.evaluation.verdict import (
    Probe,
    UnsupportedTest,
    VerdictError,
    decode_value,
    defined_names,
    judge,
    plan_tests,
)


def _roundtrip(v):
    return decode_value(json.loads(json.dumps(child.encode(v))))


@pytest.mark.parametrize("value", [
    None, True, False, 0, -5, 2 ** 80, -(2 ** 100), 1.5, float("inf"), -0.0, 1e-300, 3 + 4j, "", "héllo",
    b"\x00\xff", bytearray(b"ab"), [1, [2, (3,)]], (), {1, 2}, frozenset({"a"}), {"a": [1], (1, 2): {3}},
    collections.OrderedDict(a=1), collections.Counter("aab"), collections.deque([1, 2]),
    decimal.Decimal("1.10"), fractions.Fraction(2, 6), range(1, 10, 3), int, str,
])
def test_encode_decode_roundtrip(value):
    out = _roundtrip(value)
    assert out == value and type(out) is type(value)


def test_iterators_views_and_namedtuples_are_materialised():
    assert list(_roundtrip(map(str, [1, 2]))) == ["1", "2"]
    assert list(_roundtrip(x * x for x in range(3))) == [0, 1, 4]
    assert _roundtrip({1: 2}.keys()) == {1}  # dict_keys compare like sets
    assert list(_roundtrip({1: 2}.values())) == [2] and dict(_roundtrip({1: 2}.items())) == {1: 2}
    assert _roundtrip(collections.defaultdict(list, a=[1])) == {"a": [1]}
    Point = collections.namedtuple("Point", "x y")
    assert _roundtrip(Point(1, 2)) == (1, 2) and type(_roundtrip(Point(1, 2))) is tuple
    assert math.isnan(_roundtrip(float("nan")))


class EqAll:
    def __eq__(self, other):
        return True


class IntEq(int):
    def __eq__(self, other):
        return True


class FakeTuple(tuple):
    _fields = ("a",)

    def __eq__(self, other):
        return True


@pytest.mark.parametrize("value", [
    EqAll(), IntEq(3), type("S", (str,), {})("x"), type("D", (dict,), {})(), [EqAll()], {"k": EqAll()},
    object(), lambda: 0, itertools.count(), ValueError("x"), EqAll,
])
def test_encode_refuses_non_plain_values(value):
    with pytest.raises(child.EncodeError):
        child.encode(value)


def test_encode_limits_depth_size_and_iterators():
    deep: list = []
    for _ in range(child.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(child.EncodeError, match="deeply"):
        child.encode(deep)
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(child.EncodeError):
        child.encode(cyclic)
    with pytest.raises(child.EncodeError, match="too large"):
        child.encode(list(range(child.MAX_NODES + 1)))
    with pytest.raises(child.EncodeError, match="iterator"):
        child.encode(iter(range(child.MAX_ITER + 1)))
    # A named tuple's content is compared, not its __eq__: content (9,) is not (1,)
    assert child.encode(FakeTuple((9,))) == ["tuple", [9]]


@pytest.mark.parametrize("bad", [
    {"x": 1}, 1.5, 2 ** 60, ["nope", []], ["list"], ["list", 1], ["int", "zz"], ["int", "f" * 200_000],
    ["float", "zz"], ["dict", [[1]]], ["dict", [[[ "list", []], 1]]], ["type", "object"], ["range", 0, 10 ** 12, 1],
    ["Fraction", 1, 0], ["Fraction", ["float", "0x1p0"], 1], ["Decimal", "x"], [],
])
def test_decode_is_strict(bad):
    with pytest.raises(VerdictError):
        decode_value(bad)


def test_decode_refuses_deep_json():
    v: list = [1]
    for _ in range(500):
        v = ["list", [v]]
    with pytest.raises(VerdictError):
        decode_value(v)


# ------------------------------------------------------------------------------------- planning
def _probes(plan):
    return [s[2] for s in plan.steps if s[0] == "probe"]


def test_plan_minimal_probes():
    plan = plan_tests(
        "import math\nassert f([1, 2], 3) == (4, 5)\nassert set(g(1)) == set([1, 2])\n"
        "assert math.isclose(h(2), 0.5, rel_tol=1e-3)\nassert not k(1) and k(2)\n"
        "assert f(1).lower() == 'a'\nassert tuple_size(t) == sys.getsizeof(t)",
        names_under_test={"f", "g", "h", "k", "tuple_size"},
    )
    assert plan.steps[0] == ["exec", "import math"]
    assert _probes(plan) == ["f([1, 2], 3)", "g(1)", "h(2)", "k(1)", "k(2)", "f(1)", "tuple_size(t)", "t"]
    truth = [s[3] for s in plan.steps if s[0] == "probe"]
    assert truth[:5] == ["value", "value", "value", "truth", "truth"]
    assert len(plan.asserts) == 6 and all(a.probes for a in plan.asserts)


def test_reference_names_decide_the_program_side():
    # MBPP task 126 names its function ``sum``: with the reference's names it is the program's.
    plan = plan_tests("assert sum(10, 15) == 6", names_under_test={"sum"})
    assert _probes(plan) == ["sum(10, 15)"]
    # A candidate cannot move ``set``/``sorted``/``math`` to its side: they stay with the judge.
    plan = plan_tests("assert set(f(1)) == set([1])\nassert sorted(f(2)) == [1]", names_under_test={"f"})
    assert _probes(plan) == ["f(1)", "f(2)"]
    # Setup statements' names are program-side (they run in the sandbox).
    plan = plan_tests("root = Node(1)\nassert is_balanced(root) == True", names_under_test={"Node", "is_balanced"})
    assert plan.steps[0][0] == "exec" and _probes(plan) == ["is_balanced(root)"]
    # Without a reference: what the program defines, including a shadowed builtin.
    assert defined_names("import os.path as p, re\ndef sum(a): pass\nclass A: pass\nx, (y, z) = 1, (2, 3)\n"
                         "for i in []: pass\nif True:\n    w = 1\n") == {"p", "re", "sum", "A", "x", "y", "z", "i", "w"}


@pytest.mark.parametrize("tests", [
    "assert [f(i) for i in range(3)] == [0, 1, 2]",
    "assert all(map(lambda x: f(x), [1]))",
    "assert (y := f(1)) == 1",
    "for i in range(3):\n    assert f(i) == i",
    "def check():\n    assert f(1) == 1\ncheck()",
    "assert f(1 == 1",
    "x" * 300_000,
])
def test_unsplittable_tests_are_refused(tests):
    with pytest.raises(UnsupportedTest):
        plan_tests(tests, {"f"})


def test_trusted_parts_may_use_comprehensions_and_lambdas():
    plan = plan_tests("assert f(3) == [i * i for i in range(3)]\nassert sorted(f(1), key=lambda t: -t) == [2, 1]", {"f"})
    assert judge(plan, {0: [0, 1, 4], 1: [1, 2]}, {}) == (True, "ok")


# ------------------------------------------------------------------------------------- judging
def _judge(tests, values, errors=None, names=("f",)):
    plan = plan_tests(tests, set(names))
    return judge(plan, dict(enumerate(values)), errors or {})


def test_judge_semantics():
    assert _judge("assert f(1) == 2", [2])[0]
    ok, reason = _judge("assert f(1) == 2", [3])
    assert not ok and "got 3" in reason
    assert _judge("assert f(1) == True", [1])[0]  # Python's 1 == True
    assert not _judge("assert f(1) == [1, 2]", [iter([1, 2])])[0]  # a generator is not a list
    assert _judge("assert list(f(1)) == [1, 2]", [iter([1, 2])])[0]
    assert _judge("assert set(f(1)) == set((1, 2))", [[2, 1, 1]])[0]
    assert _judge("import math\nassert math.isclose(f(1), 0.333, rel_tol=0.01)", [1 / 3])[0]
    assert not _judge("import math\nassert math.isclose(f(1), 0.5)", [1 / 3])[0]
    assert not _judge("assert f(1)", [0])[0] and _judge("assert not f(1)", [False])[0]
    assert not _judge("assert f(1) == float('nan')", [float("nan")])[0]
    assert _judge("assert f(1) == {'a': 1}", [collections.Counter(a=1)])[0]
    ok, reason = _judge("assert f(1) == 1", [], {0: "f(1) raised ZeroDivisionError"})
    assert not ok and "ZeroDivisionError" in reason
    ok, reason = _judge("assert f(1) == 1", [])
    assert not ok and "no value" in reason
    assert not _judge("assert f(1) + 1 == 'a1'", ["a"])[0]  # TypeError in the parent: a failure, not a crash
    # short-circuit: an unneeded probe's error does not matter, as in Python
    assert _judge("assert f(1) or f(2)", [True], {1: "boom"})[0]


@pytest.mark.parametrize("expr", [
    "assert f(1) == 10 ** 10 ** 8", "assert f(1) == 'a' * 10 ** 9", "assert f(1) == [0] * 10 ** 9",
    "assert f(1) == 1 << 10 ** 9", "assert f(1) == pow(7, 10 ** 9)", "assert f(1) == '%0999999999d' % 1",
    "assert f(1) == list(range(10 ** 12))", "assert f(1) == sum([[1]] * 1000, [])",
    "assert f(1) == [i * j for i in range(10 ** 5) for j in range(10 ** 5)]",
    "import math\nassert f(1) == math.factorial(10 ** 8)", "assert f(1) == (1).__class__.__subclasses__()",
    "import math\nassert f(1) == math.os", "assert f(1) == 'x'.ljust(10 ** 9)", "assert f(1) == sum(range(10 ** 7))",
])
def test_judge_refuses_expensive_or_unsafe_trusted_expressions(expr):
    plan = plan_tests(expr, {"f"})
    assert list(plan.probe_sources.values()) == ["f(1)"]
    ok, reason = judge(plan, {0: 1}, {})
    assert not ok and "failed" in reason


@pytest.mark.parametrize("expr, probe", [
    ("assert f(1) == __import__('os').system('true')", "__import__('os').system('true')"),
    ("assert f(1) == open('/etc/passwd').read()", "open('/etc/passwd').read()"),
    ("assert f(1) == bytes(10 ** 12)", "bytes(10 ** 12)"),
    ("assert f(1) == eval('1')", "eval('1')"),
])
def test_unknown_names_are_never_evaluated_by_the_judge(expr, probe):
    """Anything outside the judge's small trusted set runs in the sandbox, not here."""
    plan = plan_tests(expr, {"f"})
    assert list(plan.probe_sources.values()) == ["f(1)", probe]


# ------------------------------------------------------------------------------------- MBPP
def _mbpp_records(shared_data):
    full = [json.loads(line) for line in open(shared_data / "mbpp" / "mbpp.jsonl", encoding="utf-8")]
    san = json.load(open(shared_data / "mbpp" / "sanitized-mbpp.json", encoding="utf-8"))
    return full + san


def test_every_mbpp_assert_is_judged_outside_the_sandbox(shared_data):
    """All 974 + 427 tasks' asserts (challenge tests too) split into probes of the function under
    test, and no expected side needs the sandbox: the program controls only its own outputs."""
    if not (shared_data / "mbpp" / "mbpp.jsonl").exists():
        pytest.skip("MBPP data not present")
    n = 0
    for r in _mbpp_records(shared_data):
        names = defined_names(r["code"])
        tests = (r.get("test_setup_code") or "") + "\n" + "\n".join(r["test_list"] + r.get("challenge_test_list", []))
        plan = plan_tests(tests, names)
        for a in plan.asserts:
            n += 1
            assert a.probes, (r["task_id"], a.source)
            for i in a.probes:  # each probe is a call of a name the reference defines
                head = ast.parse(plan.probe_sources[i], mode="eval").body
                assert isinstance(head, ast.Call) and isinstance(head.func, ast.Name) and head.func.id in names, (r["task_id"], a.source)
            # the right-hand side of every comparison is evaluated by the judge alone
            if isinstance(a.expr, ast.Compare):
                for comp in a.expr.comparators:
                    assert not any(isinstance(x, Probe) for x in ast.walk(comp)), (r["task_id"], a.source)
    assert n > 4000
