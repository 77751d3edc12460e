"""Reward functions for on-policy RL (GRPO): the task checkers as rewards, and a registry.

A reward function gives every completion one float::

    def my_reward(prompts: list[str], completions: list[str], **context) -> array-like [N]

``prompts[i]`` is the prompt text that ``completions[i]`` continues (repeated once per sample of
a group). A function receives the context keywords it declares (all of them with ``**kwargs``):

- ``examples``: the task :class:`~sgalm_jax.data.Example` (or the JSONL record, a dict) of each
  completion;
- ``task``: the :class:`~sgalm_jax.data.Task` the prompts come from (None for JSONL prompts);
- ``completion_ids``: each completion's token ids (the stop token included when it stopped);
- ``finished``: bool array, True where the completion ended with a stop token (not truncated).

NaN means "could not be scored": the completion is left out of its group's baseline and gets
advantage 0 (TRL's convention). A function is named in ``grpo.reward`` by a registered name, or
as ``"package.module:function"`` (imported on use). Register with the decorator::

    from sgalm_jax.evaluation.rewards import register_reward

    @register_reward("brevity")
    def brevity(prompts, completions):
        return [-len(c) / 100 for c in completions]

Built-in rewards (they use the task's own checker, so they are only as lenient as the evaluation):

- ``correct``: 1.0 when the task's checker accepts the output, else 0.0: GSM8K and the arithmetic
  task compare the final ``#### n`` number exactly; MBPP runs the tests in the sandbox; ARC
  compares the chosen letter.
- ``valid``: 1.0 when every step of a GSM8K-format worked answer checks (:meth:`check_sample` of
  the GSM8K and arithmetic tasks; arithmetic is exact and checks where each operand comes from).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable, Sequence

import numpy as np

from sgalm_jax.errors import ConfigError, SgalmError

log = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
CONTEXT_KEYS = ("examples", "task", "completion_ids", "finished")

_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = True):
    """Register ``fn`` as reward ``name`` (usable as a decorator)."""

    def deco(f: RewardFn) -> RewardFn:
        if name in _REWARDS and not overwrite and _REWARDS[name] is not f:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def list_rewards() -> list[str]:
    return sorted(_REWARDS)


def get_reward(spec: str) -> RewardFn:
    """The reward function ``spec``: a registered name or ``"module:function"``.

    Raises ConfigError (without a key; callers prefix the config key) when it cannot be found.
    """
    spec = spec.strip()
    if spec in _REWARDS:
        return _REWARDS[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ConfigError(f"reward {spec!r}: {module_name} has no function {attr!r}")
        return fn
    raise ConfigError(f"unknown reward {spec!r}; registered: {list_rewards()}, or give "
                      "'package.module:function'")


def call_reward(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                name: str = "reward", **context: Any) -> np.ndarray:
    """``fn``'s rewards as a float64 array [N], passing the context keywords it accepts.

    A result that is not one finite-or-NaN number per completion is an error naming ``name``.
    """
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        kwargs = dict(context)
    else:
        names = {p.name for p in params}
        kwargs = {k: v for k, v in context.items() if k in names}
    out = np.asarray(fn(list(prompts), list(completions), **kwargs), dtype=np.float64)
    if out.shape != (len(completions),):
        raise SgalmError(f"reward {name!r} returned shape {out.shape} for {len(completions)} "
                         "completions; expected one float per completion")
    if np.isinf(out).any():
        raise SgalmError(f"reward {name!r} returned an infinite value (use NaN for 'cannot "
                         "score')")
    return out


# ------------------------------------------------------------------------------------ built-ins
@register_reward("correct")
def correct(prompts: Sequence[str], completions: Sequence[str], *, examples: Sequence[Any],
            task: Any) -> list[float]:
    """1.0 where the task's checker accepts the completion (see the module docstring)."""
    if task is None:
        raise ConfigError("grpo.reward: 'correct' needs prompts from a task (data.task), whose "
                          "checker scores the answers")
    scores = task.score_batch(list(examples), list(completions))
    return [1.0 if s.correct else 0.0 for s in scores]


@register_reward("valid")
def valid(prompts: Sequence[str], completions: Sequence[str], *, examples: Sequence[Any],
          task: Any) -> list[float]:
    """1.0 where every step of the worked answer checks (GSM8K-format tasks)."""
    from sgalm_jax.data import format_qa, truncate_at_stop

    check = getattr(task, "check_sample", None)
    if check is None:
        raise ConfigError(f"grpo.reward: 'valid' needs a task with a step checker (gsm8k, "
                          f"arithmetic), not {getattr(task, 'name', task)!r}")
    stops = getattr(task, "stop_sequences", ())
    return [1.0 if check(format_qa(ex.question, truncate_at_stop(c, stops).strip()))[0] else 0.0
            for ex, c in zip(examples, completions)]


__all__ = ["CONTEXT_KEYS", "RewardFn", "call_reward", "correct", "get_reward", "list_rewards",
           "register_reward", "valid"]
