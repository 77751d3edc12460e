"""GSM8K answer extraction / step checking on real data, and the built-in arithmetic task."""

from __future__ import annotations

import random
import re

import pytest

from sgalm_jax.data import (
    ArithmeticTask,
    GSM8KTask,
    check_arithmetic_sample,
    check_gsm8k_sample,
    check_gsm8k_sample_text,
    extract_final_answer,
    format_qa,
    normalize_number,
    parse_qa,
)
from sgalm_jax.data.math_steps import check_steps, eval_expr


@pytest.fixture(scope="module")
def gsm8k_test(shared_data):
    task = GSM8KTask(shared_data / "gsm8k")
    return task, task.load("test")


@pytest.mark.parametrize(
    "raw,norm",
    [("18", "18"), ("$1,234.", "1234"), ("1,234.50", "1234.5"), ("-3", "-3"), ("18.00", "18"), (".5", "0.5"), ("abc", None), ("−7", "-7")],
)
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


@pytest.mark.parametrize(
    "text,ans",
    [
        ("so the total is 5.\n#### 1,000", "1000"),
        ("The answer is $42.", "42"),
        ("It costs 3 apples and 12 pears, so 15", "15"),
        ("#### $18.00.", "18"),
        ("no numbers here", None),
        ("first 7 #### then 8 and 9", "8"),
    ],
)
def test_extract_final_answer(text, ans):
    assert extract_final_answer(text) == ans


def test_gold_answers_extract_and_match_100_percent(gsm8k_test):
    task, test = gsm8k_test
    correct = [task.check_answer(ex, " " + ex.answer) for ex in test]
    assert sum(correct) == len(test) == 1319


def test_perturbed_answers_match_0_percent(gsm8k_test):
    task, test = gsm8k_test
    rng = random.Random(0)
    wrong = 0
    for ex in test:
        head, final = ex.answer.rsplit("####", 1)
        n = int(normalize_number(final))
        bad = head + f"#### {n + rng.choice([-2, -1, 1, 2, 10])}"
        wrong += task.check_answer(ex, bad)
        # a free-text answer whose last number is off by one also fails
        wrong += task.check_answer(ex, f"I think it is {n + 1}.")
    assert wrong == 0


def test_step_checker_on_gold_and_perturbed(gsm8k_test):
    _, test = gsm8k_test
    lenient = [check_gsm8k_sample(ex.question, ex.answer)[0] for ex in test]
    assert all(lenient)
    strict = [check_gsm8k_sample(ex.question, ex.answer, strict=True)[0] for ex in test]
    assert 0.9 < sum(strict) / len(strict) < 1.0  # ~92%: some gold answers end in un-annotated reasoning
    rejected = total = 0
    for ex in test:
        m = re.search(r"<<([^<>]*?)=([^<>=]*)>>", ex.answer)
        if not m:
            continue
        val = normalize_number(m.group(2))
        if val is None:
            continue
        bad_val = str(int(float(val)) + 7)
        bad = ex.answer[: m.start(2)] + bad_val + ex.answer[m.end(2):]
        total += 1
        rejected += not check_gsm8k_sample(ex.question, bad)[0]
    assert total > 1200 and rejected == total


def test_eval_expr():
    assert eval_expr("16-3-4") == 9
    assert eval_expr("80000*.5") == 40000
    assert eval_expr("1,200/4") == 300
    assert eval_expr("20%*50") == 10
    for bad in ("__import__('os')", "2**1000", "x+1", "1/0"):
        with pytest.raises(ValueError):
            eval_expr(bad)


def test_qa_text_roundtrip():
    text = format_qa("What is 2+3?", "2+3=<<2+3=5>>5\n#### 5")
    assert parse_qa(text) == ("What is 2+3?", "2+3=<<2+3=5>>5\n#### 5")
    assert parse_qa("no structure") is None
    assert check_gsm8k_sample_text(text) == (True, "ok")
    assert not check_gsm8k_sample_text("Question: x\nAnswer: 2+3=<<2+3=6>>6\n#### 6")[0]


# ------------------------------------------------------------------------------ arithmetic task
def test_arithmetic_samples_pass_checker():
    task = ArithmeticTask(seed=3, sizes={"train": 400, "test": 100})
    for split in ("train", "test"):
        for ex in task.load(split):
            ok, reason = check_arithmetic_sample(ex.question, ex.answer)
            assert ok, (reason, ex.question, ex.answer)
            assert task.check_sample(task.sample_text(ex)) == (True, "ok")
            assert task.check_answer(ex, " " + ex.answer)


def test_arithmetic_is_seeded_and_sized():
    a = ArithmeticTask(seed=1, sizes={"test": 50}).load("test")
    b = ArithmeticTask(seed=1, sizes={"test": 50}).load("test")
    c = ArithmeticTask(seed=2, sizes={"test": 50}).load("test")
    assert [e.answer for e in a] == [e.answer for e in b] and len(a) == 50
    assert [e.question for e in a] != [e.question for e in c]
    train_q = {e.question for e in ArithmeticTask(seed=1, sizes={"train": 200}).load("train")}
    assert len(train_q) == 200 and len(train_q & {e.question for e in a}) <= 2
    assert len(ArithmeticTask(seed=0, sizes={"train": 5000}).load("train")) == 5000


def _corruptions(q: str, a: str):
    steps = list(re.finditer(r"<<([^<>]*?)=([^<>=]*)>>(\d+)", a))
    last = steps[-1]
    first = steps[0]
    final = a.rsplit("#### ", 1)[1]
    yield "wrong result", a[: first.start(2)] + str(int(first.group(2)) + 1) + a[first.end(2):]
    yield "visible mismatch", a[: first.start(3)] + str(int(first.group(3)) + 1) + a[first.end(3):]
    yield "wrong final", a.rsplit("#### ", 1)[0] + f"#### {int(final) + 1}"
    yield "no final", a.rsplit("\n#### ", 1)[0]
    # an operand that is neither in the question nor a previous result (consistent arithmetic)
    x = 987654
    expr = f"{x}+1"
    yield "unknown operand", a[: first.start(1)] + expr + "=" + str(x + 1) + ">>" + str(x + 1) + a[first.end(3):]
    # the written expression differs from the annotation
    line_start = a.rfind("\n", 0, last.start()) + 1
    prefix = a[line_start: last.start()]
    if re.search(r"\d+ [\+\-\*/] \d+ = \$?$", prefix):
        yield "text mismatch", a[:line_start] + re.sub(r"(\d+) ([\+\-\*/]) (\d+) = ", lambda m: f"{m.group(1)} {m.group(2)} {int(m.group(3)) + 1} = ", prefix, count=1) + a[last.start():]


def test_corrupted_arithmetic_samples_fail():
    task = ArithmeticTask(seed=5, sizes={"test": 150})
    kinds = set()
    for ex in task.load("test"):
        for kind, bad in _corruptions(ex.question, ex.answer):
            ok, reason = check_arithmetic_sample(ex.question, bad)
            assert not ok, (kind, bad)
            kinds.add(kind)
    assert kinds == {"wrong result", "visible mismatch", "wrong final", "no final", "unknown operand", "text mismatch"}


def test_check_steps_provenance_and_lenient_rounding():
    assert check_steps("10/3=<<10/3=3.33>>3.33\n#### 3.33")[0]
    assert not check_steps("10/3=<<10/3=3.33>>3.33\n#### 3.33", exact=True)[0]
    ok, reason = check_steps("5*4=<<5*4=20>>20\n#### 20", "Tom has 5 bags.", check_provenance=True)
    assert not ok and "operand 4" in reason
    assert check_steps("5*4=<<5*4=20>>20\n#### 20", "Tom has 5 bags of 4.", check_provenance=True)[0]


# ------------------------------------------------------------------------------ levels and solver
@pytest.mark.parametrize("level", ["easy", "medium", "hard"])
def test_arithmetic_levels_are_solved_by_the_solver(level):
    """Every generated problem of every level passes the step checker, and the task's own solver
    reads the question and gets the gold answer."""
    from sgalm_jax.data.arithmetic import LEVELS, solve_question

    task = ArithmeticTask(seed=4, level=level, sizes={"train": 300})
    opts = LEVELS[level]
    for ex in task.load("train"):
        assert task.check_sample(task.sample_text(ex)) == (True, "ok"), ex.question
        solved, why = solve_question(ex.question)
        assert why == "ok" and solved == int(ex.answer.rsplit("#### ", 1)[1])
        n_steps = ex.answer.count("<<") - ex.answer.count("boxes hold") - ("Selling" in ex.answer)
        assert opts["min_steps"] <= n_steps <= opts["max_steps"]
    if level == "easy":  # one addition or subtraction, small numbers, 2 names x 2 item words
        exs = task.load("train")
        assert all(int(x) <= 30 for e in exs for x in re.findall(r"\d+", e.answer))
        assert all(int(e.question.split()[2]) <= 15 for e in exs)
        assert all("*" not in e.answer and "/" not in e.answer for e in exs)
        assert {e.question.split()[0] for e in exs} == {"Mia"}
        assert {e.question.split()[3].rstrip(".") for e in exs} == {"apples"}
        assert len(ArithmeticTask(level="easy").load("train")) == 600  # the level's split size


def test_arithmetic_options_override_the_level_and_bad_options_are_errors():
    from sgalm_jax.errors import DataError

    exs = ArithmeticTask(seed=1, level="easy", ops="sub", sizes={"test": 40}).load("test")
    assert all(" - " in e.answer and " + " not in e.answer for e in exs)
    exs = ArithmeticTask(seed=1, ops=["mul"], min_steps=1, max_steps=1, sell_prob=0.0,
                         sizes={"test": 20}).load("test")
    assert all("times as large" in e.question for e in exs)
    with pytest.raises(DataError, match="unknown level 'trivial'"):
        ArithmeticTask(level="trivial")
    with pytest.raises(DataError, match="ops .*'pow'"):
        ArithmeticTask(ops="add,pow")
    with pytest.raises(DataError, match="min_steps <= max_steps"):
        ArithmeticTask(min_steps=3, max_steps=2)
    with pytest.raises(DataError, match="sell_prob"):
        ArithmeticTask(sell_prob=1.5)


def test_check_sample_rejects_ill_posed_questions_with_consistent_steps():
    """A sample whose worked answer checks out but whose question is not a story of the task
    (another item word midway, giving away more than there is, no question) is invalid."""
    from sgalm_jax.data.arithmetic import solve_question

    task = ArithmeticTask(level="easy")
    good = ("Question: Mia has 7 apples. She buys 5 more apples. How many apples does Mia have "
            "now?\nAnswer: Mia then has 7 + 5 = <<7+5=12>>12 apples.\n#### 12")
    assert task.check_sample(good) == (True, "ok")
    other_item = good.replace("buys 5 more apples", "buys 5 more marbles")
    assert not task.check_sample(other_item)[0] and "marbles" in task.check_sample(other_item)[1]
    wrong_final = good.replace("12 apples.\n#### 12", "12 apples.\n#### 13")
    assert not task.check_sample(wrong_final)[0]
    # the arithmetic is right, but the question asks about someone else
    who = good.replace("does Mia have", "does Noah have")
    assert not task.check_sample(who)[0]
    assert solve_question("Mia has 3 apples. Then she gives 5 apples to a friend. How many "
                          "apples does Mia have now?")[0] is None
    assert solve_question("Mia has 3 apples. How many apples does Mia have now?") == (
        None, "no story step between the start and the question")
    assert solve_question("Mia has 3 apples. She buys 2 more apples.")[0] is None
    assert solve_question("Mia has 12 apples. She splits the apples equally into 3 bags and "
                          "keeps only one bag. Then the number of apples Mia has becomes 5 times "
                          "as large. Each of the apples sells for $2. How much money does Mia "
                          "make by selling all of them?") == (40, "ok")
