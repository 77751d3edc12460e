"""Reward functions for GRPO: the task checkers as rewards, the registry, "module:function"
names, context keywords, and bad results."""

from __future__ import annotations

import numpy as np
import pytest

from sgalm_jax.data import get_task
from sgalm_jax.errors import ConfigError, SgalmError
from sgalm_jax.evaluation.rewards import call_reward, get_reward, list_rewards, register_reward


def test_correct_and_valid_use_the_task_checkers():
    task = get_task("arithmetic", sizes={"train": 2})
    ex = task.load("train")
    right = " " + ex[0].answer  # the worked solution: every step checks, final number right
    wrong_final = right.rsplit("####", 1)[0] + "#### 100000"
    noise = " I do not know.\n\nQuestion: next"
    comps = [right, wrong_final, noise, " " + ex[1].answer]
    examples = [ex[0], ex[0], ex[0], ex[1]]
    prompts = [task.format_prompt(e) for e in examples]
    r = call_reward(get_reward("correct"), prompts, comps, examples=examples, task=task,
                    completion_ids=[[1]] * 4, finished=np.ones(4, bool))
    np.testing.assert_array_equal(r, [1.0, 0.0, 0.0, 1.0])
    v = call_reward(get_reward("valid"), prompts, comps, examples=examples, task=task)
    np.testing.assert_array_equal(v, [1.0, 0.0, 0.0, 1.0])  # "#### 100000" is not the last value
    with pytest.raises(ConfigError, match="needs prompts from a task"):
        call_reward(get_reward("correct"), prompts, comps, examples=examples, task=None)


def test_registry_imports_and_context_keywords():
    @register_reward("test_len")
    def by_length(prompts, completions, **context):
        assert set(context) == {"examples", "task", "completion_ids", "finished"}
        return [len(c) for c in completions]

    assert "test_len" in list_rewards() and get_reward("test_len") is by_length
    out = call_reward(by_length, ["p", "p"], ["ab", "abcd"], examples=[None] * 2, task=None,
                      completion_ids=[[1], [2]], finished=np.ones(2, bool))
    np.testing.assert_array_equal(out, [2.0, 4.0])
    fn = get_reward("tests.algorithms.grpo_rewards:low_token_fraction")
    np.testing.assert_allclose(call_reward(fn, ["p"], ["x"], completion_ids=[[1, 300, 2, 400]],
                                           examples=[None]), [0.5])
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(SgalmError, match="returned shape"):
        call_reward(lambda p, c: [1.0], ["p", "p"], ["a", "b"], name="short")
    with pytest.raises(SgalmError, match="infinite"):
        call_reward(lambda p, c: [np.inf], ["p"], ["a"], name="inf")
    assert np.isnan(call_reward(lambda p, c: [np.nan], ["p"], ["a"]))[0]  # NaN: not scored
