"""Pure-Python pieces of SGALM: sample checks, diversity, ROUGE-L, n-gram dedupe, completion
trimming, minibatches, the demo's config overlay, and the metrics plot's series."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sgalm_jax.algorithms import diagnostics as diag
from sgalm_jax.algorithms.sgalm_data import Minibatches, pad_rows, trim_completion
from sgalm_jax.data import get_task
from sgalm_jax.training.tokenizer import build_tiny_tokenizer


def _lcs_dp(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_and_rouge_l_match_the_textbook_dp():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        assert diag.lcs_length(a, b) == _lcs_dp(a, b)
    assert diag.rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat" = 4 of 6 and 5 tokens: F1 = 2 * 4 / 11
    assert diag.rouge_l_f1("the cat sat on the mat", "the cat ate the mat") == pytest.approx(8 / 11)
    assert diag.rouge_l_f1("", "x") == 0.0


def test_rouge_filter_is_exact_against_all_pairs():
    rng = random.Random(1)
    vocab = "apples pears Mia Noah has buys gives 3 4 5 how many does".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 12))) for _ in range(120)]
    filt = diag.RougeFilter(0.7, seeds=texts[:10])
    kept = list(texts[:10])
    for t in texts[10:]:
        brute = max(diag.rouge_l_f1(t, k) for k in kept) > 0.7
        assert filt.add_if_novel(t) == (not brute)
        if not brute:
            kept.append(t)
    assert 0 < len(kept) - 10 < 110


def test_arithmetic_checks_and_split():
    task = get_task("arithmetic")
    real = task.sample_text(task.load("train", limit=1)[0])
    assert diag.well_formed(task, real)
    assert diag.check_validity(task, [real]) == [(True, "ok")]
    head, final = real.rsplit("#### ", 1)
    broken = f"{head}#### {int(final) + 1}"
    assert diag.check_validity(task, [broken])[0][0] is False
    assert not diag.well_formed(task, "Question: no answer here")
    prompt, response = diag.split_sample(task, real)
    assert prompt.startswith("Question:") and prompt.endswith("Answer:")
    assert response.startswith(" ") and "####" in response
    assert diag.has_checker(task)


def test_mbpp_sample_parsing_and_validity():
    from sgalm_jax.data import MBPPTask

    task = MBPPTask()
    good = ("You are an expert Python programmer, and here is your task: Write a function to add "
            "two numbers. Your code should pass these tests:\n\nassert add(1, 2) == 3\n"
            "assert add(0, 0) == 0\n[BEGIN]\ndef add(a, b):\n    return a + b\n[DONE]")
    bad = good.replace("return a + b", "return a - b")
    desc, tests, code = diag.parse_mbpp_sample(good)
    assert desc.startswith("Write a function") and len(tests) == 2 and "def add" in code
    assert diag.well_formed(task, good) and not diag.well_formed(task, "def f(): pass")
    valid = diag.check_validity(task, [good, bad, "garbage"])
    assert [v for v, _ in valid] == [True, False, False]
    prompt, response = diag.split_sample(task, good)
    assert prompt.endswith("[BEGIN]\n") and response.endswith("\n[DONE]")


def test_diversity_measures():
    texts = ["a b c d", "a b c d", "e f g h i j"]
    d = diag.diversity(texts, reference=["e f g h i j"])
    assert d["duplicates"] == pytest.approx(1 / 3) and d["copies"] == pytest.approx(1 / 3)
    assert d["distinct_1"] == pytest.approx(10 / 14)
    assert diag.repetition_rate(["x y x y x y x y"]) == pytest.approx(1 - 2 / 5)
    assert diag.repetition_rate(["one two three four five"]) == 0.0


def test_ngram_overlap():
    idx = diag.NgramIndex(["the quick brown fox jumps over the lazy dog"], n=3)
    assert idx.overlap("the quick brown fox") == 1.0
    assert idx.overlap("a quick brown fox sleeps") == pytest.approx(1 / 3)
    assert idx.overlap("two words") == 0.0


def test_trim_completion_keeps_a_prefix_of_the_sampled_ids():
    tok = build_tiny_tokenizer()
    text = "Question: Mia has 3 apples.\nAnswer: 3 + 4 = 7\n#### 7\n### Example 3\nQuestion: x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    kept, out, cut = trim_completion(tok, ids, ["### Example"])
    assert cut and kept == ids[:len(kept)]
    assert out.strip() == "Question: Mia has 3 apples.\nAnswer: 3 + 4 = 7\n#### 7"
    same, out2, cut2 = trim_completion(tok, ids[:5], ["### Example"])
    assert not cut2 and same == ids[:5]


def test_pad_rows_and_minibatches():
    b = pad_rows([[5, 6, 7], [8]], bucket=2, pad_id=0, num_rows=3,
                 loss_masks=[[0, 1, 1], [1]])
    assert b["input_ids"].shape == (3, 4)  # 3 tokens -> 2 * 2
    assert b["last"].tolist() == [2, 0, 0] and b["row_mask"].tolist() == [1, 1, 0]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 0]
    mb = Minibatches(num_fakes=10, num_reals=7, half=4, seed=0, iteration=1)
    epoch = sorted(mb.fakes(0) + mb.fakes(1))
    assert len(set(epoch)) == 8 and mb.fakes(0) == Minibatches(10, 7, 4, 0, 1).fakes(0)
    assert len(mb.reals(5)) == 4
    assert len(Minibatches(2, 2, 4, 0, 0).fakes(0)) == 4  # fewer items than a half batch


def test_demo_overlay_keeps_explicit_overrides():
    from sgalm_jax.algorithms.demo import demo_config, overlay
    from sgalm_jax.config import base_config

    given = base_config()
    given.seed = 5
    given.sgalm.iterations = 7
    out = overlay(demo_config(), given)
    assert out.seed == 5 and out.sgalm.iterations == 7
    assert out.sgalm.num_shots == demo_config().sgalm.num_shots != given.sgalm.num_shots
    assert out.model.hf_config.hidden_size == demo_config().model.hf_config.hidden_size


def test_plot_series(tmp_path):
    from sgalm_jax.tools import plot_metrics

    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 1, "d_loss": 0.7, "d_real": 0.5, "d_fake": 0.5},
            {"step": 2, "g_loss": 0.1},
            {"step": 2, "diag/validity": 0.25, "diag/distinct_2": 0.8, "diag/d_fake": 0.4},
            {"step": 2, "samples/iter_000": "text"}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    series = plot_metrics.load_series(str(path))
    assert series["d_loss"] == ([1], [0.7]) and series["g_loss"] == ([2], [0.1])
    assert "samples/iter_000" not in series
    panels = plot_metrics.panels(series)
    assert [p[0] for p in panels][:2] == ["losses", "D on real / generated"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            plot_metrics.main([str(path), "-o", str(tmp_path / "p.png")])
        return
    plot_metrics.main([str(path), "-o", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert np.isfinite(series["d_loss"][1][0])
