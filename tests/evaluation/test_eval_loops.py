"""Evaluation loops with stand-in models: GSM8K, ARC (log-likelihood and generation), MBPP, writer."""

from __future__ import annotations

import itertools
import json
import math
from math import comb

import pytest

from sgalm_jax.data import ARCTask, ArithmeticTask, GSM8KTask, MBPPTask, PromptBuilder, PromptConfig
from sgalm_jax.errors import SgalmError
from sgalm_jax.evaluation import (
    choose,
    evaluate_arc_generate,
    evaluate_arc_loglik,
    evaluate_gsm8k,
    evaluate_mbpp,
    gsm8k_exact_match,
    pass_at_k,
    write_results,
)


def _oracle_generate(examples, prompt_fn, answer_fn):
    """A generate_fn that knows the gold answer of each prompt."""
    table = {prompt_fn(e): answer_fn(e) for e in examples}
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return [table[p] for p in prompts]

    return generate, calls


# ------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_oracle_and_wrong_and_files(shared_data, tmp_path):
    task = GSM8KTask(shared_data / "gsm8k")
    test = task.load("test", limit=40)
    builder = PromptBuilder.for_task(task, PromptConfig(k_shot=2, seed=0))
    gen, calls = _oracle_generate(test, builder.build, lambda e: " " + e.answer + "\n\nQuestion: next one")
    res = evaluate_gsm8k(test, gen, task=task, prompt_fn=builder.build, batch_size=16, out_dir=tmp_path, progress=False)
    assert res.metrics["exact_match"] == 1.0 and res.metrics["n"] == 40
    assert res.metrics["steps_valid"] == 1.0
    assert calls == [16, 16, 8]
    summary = json.loads((tmp_path / "gsm8k_summary.json").read_text())
    assert summary["exact_match"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "gsm8k_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"id", "prompt", "output", "extracted", "correct"} <= set(rows[0])
    assert "Question: next one" not in rows[0]["output"]  # cut at the stop sequence
    wrong = evaluate_gsm8k(test, lambda ps: ["The answer is 123456789."] * len(ps), task=task, progress=False)
    assert wrong.metrics["exact_match"] == 0.0
    with pytest.raises(SgalmError, match="completions"):
        evaluate_gsm8k(test, lambda ps: ps[:-1], task=task, progress=False)
    assert gsm8k_exact_match("so #### 1,000.", "1000") and gsm8k_exact_match("42", "blah\n#### 42")


def test_arithmetic_task_eval_reports_step_validity():
    task = ArithmeticTask(seed=0, sizes={"test": 30})
    test = task.load("test")
    res = evaluate_gsm8k(test, lambda ps: [" 1+1=<<1+1=3>>3\n#### 3"] * len(ps), task=task, progress=False, name="arith")
    assert res.metrics["steps_valid"] == 0.0
    gen, _ = _oracle_generate(test, task.format_prompt, lambda e: " " + e.answer)
    assert evaluate_gsm8k(test, gen, task=task, progress=False).metrics["steps_valid"] == 1.0


# --------------------------------------------------------------------------------------- ARC
def test_arc_loglik_oracle(shared_data, tmp_path):
    task = ARCTask(shared_data / "arc_challenge", style="cloze")
    test = task.load("test")
    sample = [e for e in test if len(e.fields["choices"]) != 4][:7] + test[:60]
    gold = {}
    for e in sample:
        for i, c in enumerate(e.fields["choices"]):
            gold[(task.format_prompt(e), " " + c)] = i == e.target
    seen = []

    def loglik(reqs):
        seen.append(len(reqs))
        return [(-1.0 if gold[r] else -50.0, gold[r]) for r in reqs]

    res = evaluate_arc_loglik(sample, loglik, task=task, batch_size=20, out_dir=tmp_path, progress=False)
    assert res.metrics["acc"] == 1.0 and res.metrics["acc_norm"] == 1.0 and res.metrics["gold_is_greedy"] == 1.0
    assert max(seen) <= 20 and sum(seen) == sum(len(e.fields["choices"]) for e in sample)
    rec = json.loads((tmp_path / "arc_challenge_loglik_examples.jsonl").read_text().splitlines()[0])
    assert rec["correct"] and len(rec["loglikelihoods"]) == len(rec["choices"])


def test_acc_norm_is_per_character():
    # choice 0: short, -3 total (-1.5/char); choice 1: long, -4 total (-0.4/char)
    assert choose([-3.0, -4.0], [2, 10]) == (0, 1)
    rec = {"id": "q", "question": "Pick.", "choices": {"text": ["ab", "abcdefghij"], "label": ["1", "2"]}, "answerKey": "2"}
    task = ARCTask(style="cloze")
    ex = task.parse_record(rec, index=0, split="test")
    lls = {" ab": -3.0, " abcdefghij": -4.0}
    res = evaluate_arc_loglik([ex], lambda reqs: [(lls[c], False) for _, c in reqs], task=task, progress=False)
    assert res.metrics["acc"] == 0.0 and res.metrics["acc_norm"] == 1.0
    assert res.records[0]["extracted"] == "A" and res.records[0]["pred_norm"] == 1 and res.records[0]["correct_norm"]


def test_arc_mc_loglik_and_generation(shared_data):
    task = ARCTask(shared_data / "arc_challenge", style="mc")
    test = task.load("test", limit=30)
    res = evaluate_arc_loglik(
        test, lambda reqs: [(0.0 if c.strip() == "D" else -1.0, False) for _, c in reqs], task=task, progress=False
    )
    always_d = sum(e.target == 3 for e in test) / len(test)
    assert res.metrics["acc"] == pytest.approx(always_d) and res.metrics["acc_norm"] == res.metrics["acc"]
    gen, _ = _oracle_generate(test, task.format_prompt, lambda e: " " + "ABCDE"[e.target] + ". " + e.answer)
    assert evaluate_arc_generate(test, gen, task=task, progress=False).metrics["acc"] == 1.0
    assert evaluate_arc_generate(test, lambda ps: [" A"] * len(ps), task=task, progress=False).metrics["acc"] == pytest.approx(
        sum(e.target == 0 for e in test) / len(test)
    )
    chat_free = PromptBuilder(task, task.load("train", limit=50), PromptConfig(k_shot=3, seed=1))
    res = evaluate_arc_generate(test, lambda ps: [" A"] * len(ps), task=task, prompt_fn=chat_free.build, progress=False)
    assert res.records[0]["prompt"].count("Question: ") == 4
    with pytest.raises(SgalmError, match="style='mc'"):
        evaluate_arc_generate(test, gen, task=ARCTask(style="cloze"), progress=False)


# -------------------------------------------------------------------------------------- MBPP
def test_pass_at_k_matches_combinatorics():
    for n, c, k in itertools.product(range(1, 8), range(0, 8), range(1, 8)):
        if c > n or k > n:
            continue
        exact = 1.0 - comb(n - c, k) / comb(n, k)
        assert math.isclose(pass_at_k(n, c, k), exact, abs_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_mbpp_eval_oracle_and_sampling(shared_data, tmp_path):
    path = shared_data / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    task = MBPPTask(str(path))
    test = task.load("test", limit=8)
    gen, _ = _oracle_generate(test, task.format_prompt, lambda e: e.answer + "\n[DONE]\nmore text")
    res = evaluate_mbpp(test, gen, task=task, out_dir=tmp_path, progress=False)
    assert res.metrics["pass@1"] == 1.0 and res.metrics["sandbox_status"] == {"passed": 8}
    summary = json.loads((tmp_path / "mbpp_summary.json").read_text())
    assert summary["sandbox_isolation"] == task.sandbox().isolation and summary["sandbox_isolation"] in ("bwrap", "guarded")
    assert summary["sandbox_isolation_detail"] and all(d.startswith(summary["sandbox_isolation"]) for d in summary["sandbox_isolation_detail"])
    # 3 samples per prompt: the 1st right, the others wrong -> pass@1 = 1/3, pass@3 = 1
    counter = {}

    def sampler(prompts):
        out = []
        for p in prompts:
            k = counter.get(p, 0)
            counter[p] = k + 1
            ex = next(e for e in test if task.format_prompt(e) == p)
            out.append(ex.answer if k == 0 else "def unrelated():\n    return None")
        return out

    res = evaluate_mbpp(test, sampler, task=task, num_samples=3, ks=(1, 3), batch_size=6, progress=False)
    assert res.metrics["pass@1"] == pytest.approx(1 / 3) and res.metrics["pass@3"] == pytest.approx(1.0)
    assert res.metrics["first_sample_pass"] == 1.0 and res.records[0]["num_correct"] == 1


def test_write_results_roundtrip(tmp_path):
    paths = write_results(tmp_path / "run" / "eval", "x", {"acc": 0.5, "nan": float("nan")}, [{"id": 1, "correct": True, "t": (1, 2)}])
    assert json.loads(open(paths["summary"]).read()) == {"acc": 0.5, "nan": "nan"}
    assert json.loads(open(paths["examples"]).read()) == {"id": 1, "correct": True, "t": [1, 2]}
