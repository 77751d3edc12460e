"""The evidence study's statistics, table, records and resumable bookkeeping (fast: no model)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from sgalm_jax.algorithms import evidence as ev


def test_mean_ci_is_the_student_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8, 31, 40):
        x = rng.normal(0.4, 0.1, n)
        mean, half, k = ev.mean_ci(x)
        se = x.std(ddof=1) / math.sqrt(n)
        q = scipy_stats.t.ppf(0.975, n - 1) if n <= 31 else 1.96
        assert k == n and mean == pytest.approx(x.mean())
        assert half == pytest.approx(q * se, rel=2e-4)
    assert ev.mean_ci([0.25])[0] == 0.25 and math.isnan(ev.mean_ci([0.25])[1])
    assert ev.mean_ci([float("nan"), 1.0, 3.0])[::2] == (2.0, 2)
    assert ev.mean_ci([])[2] == 0


def _rows():
    rows = []
    for seed, (b, s1, s2) in enumerate([(0.3, 0.4, 0.5), (0.2, 0.3, 0.2), (0.4, 0.5, 0.6)]):
        base = {k: b for k in ev.METRICS}
        rows.append({"method": "base", "seed": seed, "iteration": 0, **base})
        rows.append({"method": "sft", "seed": seed, "iteration": 1, **{k: s1 for k in ev.METRICS}})
        rows.append({"method": "sft", "seed": seed, "iteration": 2, **{k: s2 for k in ev.METRICS}})
    return rows


def test_summarize_takes_each_methods_last_iteration_and_base_at_zero():
    summary = ev.summarize(_rows())
    assert list(summary) == ["base", "sft"]
    assert summary["base"]["validity"][0] == pytest.approx(0.3)
    assert summary["sft"]["validity"][0] == pytest.approx((0.5 + 0.2 + 0.6) / 3)
    assert summary["sft"]["validity"][2] == 3
    at1 = ev.summarize(_rows(), iteration=1)
    assert at1["sft"]["copies"][0] == pytest.approx(0.4)
    table = ev.format_table(summary)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["model", "validity"] and lines[0].split()[-1] == "seeds"
    assert lines[1].startswith("pre-trained") and lines[2].startswith("SFT continued")
    assert "0.433 ± " in lines[2] and lines[2].rstrip().endswith("3")
    one = ev.format_table(ev.summarize([r for r in _rows() if r["seed"] == 0]))
    assert "±" not in one and "0.500" in one


def test_selfplay_records_are_generator_prompts_with_the_next_real_sample(tmp_path):
    from sgalm_jax.data import get_task

    config = ev.study_config()
    path = str(tmp_path / "pairs.jsonl")
    ev._write_selfplay_records(config, path)
    rows = [json.loads(x) for x in open(path)]
    task = get_task("arithmetic", **ev.TASK_OPTIONS)
    real = [task.sample_text(e) for e in task.load("train")]
    assert len(rows) == len(real) and [r["response"] for r in rows] == real
    k = config.sgalm.num_shots
    for r in rows[:50]:
        assert r["prompt"].count("### Example") == k + 1
        assert r["prompt"].endswith(f"### Example {k + 1}\n")
        assert r["response"] not in r["prompt"]  # the target is never one of its own demos
        assert task.check_sample(r["response"]) == (True, "ok")


def test_study_resumes_from_its_results_file(tmp_path):
    """A finished (method, seed, iteration) is not run again: run_seed skips it."""
    calls = []
    ev.register_method(ev.Method("probe", "probe", lambda *a: calls.append(a)))
    try:
        study = ev.Study(str(tmp_path), ev.study_config(), iterations=2, log=lambda m: None)
        with open(study.results_path, "w") as f:
            for method, t in (("base", 0), ("probe", 1), ("probe", 2)):
                f.write(json.dumps({"method": method, "seed": 0, "iteration": t,
                                    **{k: 0.5 for k in ev.METRICS}}) + "\n")
        study.run_seed(0, ["probe"])
        assert calls == [] and len(study.results()) == 3
    finally:
        ev.METHODS.pop("probe")


@pytest.mark.parametrize("every", [True, False])
def test_runners_export_only_the_evaluated_iterations(tmp_path, monkeypatch, every):
    """SFT and SGALM chain one resumed run per iteration when every iteration is evaluated (the
    study); with only the last evaluated (the demo) they make one run straight to it."""
    from sgalm_jax.algorithms import sft, sgalm

    runs = []

    def fake_run(kind):
        def run(config, workdir):
            runs.append((kind, int(config.train.num_steps) if kind == "sft"
                         else int(config.sgalm.iterations)))
            os.makedirs(os.path.join(workdir, "export"))
            with open(os.path.join(workdir, "export", "config.json"), "w") as f:
                f.write("{}")
        return run

    monkeypatch.setattr(sft, "run", fake_run("sft"))
    monkeypatch.setattr(sgalm, "run", fake_run("sgalm"))
    monkeypatch.setattr(sft, "validate", lambda c: None)
    monkeypatch.setattr(sgalm, "validate", lambda c: None)
    study = ev.Study(str(tmp_path), ev.study_config(), iterations=3, updates=20,
                     evaluate_every_iteration=every, log=lambda m: None)
    for name in ("sft", "sgalm"):
        workdir = str(tmp_path / name)
        ev.METHODS[name].run(study, study.method_config(0), workdir, 3)
        done = sorted(os.listdir(os.path.join(workdir, "iterations")))
        assert done == (["iter_001", "iter_002", "iter_003"] if every else ["iter_003"])
    assert runs == ([("sft", 20), ("sft", 40), ("sft", 60), ("sgalm", 1), ("sgalm", 2),
                     ("sgalm", 3)] if every else [("sft", 60), ("sgalm", 3)])
