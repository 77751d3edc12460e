"""GAD: the warmup's D-only steps leave the student bit-identical; an identical text scores the same
as teacher or as student through the loop's own path; the GAD stage starts from the warmup's
checkpoint and rewards the student with the discriminator's scores from *before* its update; the
checkpoint evaluation and its stopping rule; config and data errors name the key; and through the
CLI a GAD stage killed (SIGKILL) between its two updates, rerun with the same command, ends
bit-identical to an uninterrupted run, with both exports loadable by transformers.

One tiny shape family throughout (``configs/gad_tiny.py``: ``tiny-qwen2``, ``builtin:tiny``, the
offline arithmetic task whose worked solutions are the teacher's responses).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sgalm_jax.algorithms import gad
from sgalm_jax.algorithms.grpo_data import Rollout, load_rollout_records
from sgalm_jax.config import load_config_file, validate_config
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training import Checkpointer, copy_params
from tests.conftest import cli_env

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "gad_tiny.py")


def tiny_config(workdir, **overrides):
    """configs/gad_tiny.py for the 8 in-process CPU devices: 8 prompts x 2 responses a step."""
    config = load_config_file("gad_tiny.py", TINY)
    config.workdir = str(workdir)
    config.metrics.tensorboard = False
    config.train.batch_size = 16
    config.gad.num_generations = 2
    config.gad.eval_examples = 0
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def warmup(tmp_path_factory):
    """Three warmup steps (the first two D-only), recorded, then saved as a warmup checkpoint."""
    wd = tmp_path_factory.mktemp("gad_warmup")
    config = tiny_config(wd, **{"gad.d_only_steps": 2, "train.num_steps": 3})
    gad.validate(config)
    algo = gad.GAD(config, str(wd))
    ckpt = Checkpointer.from_config(str(wd / "checkpoints"), config.checkpoint)
    algo.build_roles(ckpt, None)
    student, disc = algo.roles["student"], algo.roles["discriminator"]
    seen = {"student": [_host(student.params)], "discriminator": [_host(disc.params)],
            "records": []}
    for s in range(3):
        record, _ = algo.step(s)
        seen["records"].append(record)
        seen["student"].append(_host(student.params))
        seen["discriminator"].append(_host(disc.params))
    algo.roles.save(ckpt, 3, {"stage": "warmup", "step": 3, "prompt_offset": 0})
    ckpt.close()
    return {"dir": wd, "algo": algo, "config": config, **seen}


def test_d_only_warmup_steps_leave_the_student_bit_identical(warmup):
    s, d, recs = warmup["student"], warmup["discriminator"], warmup["records"]
    assert _same(s[0], s[1]) and _same(s[0], s[2])  # steps 1-2: the discriminator alone
    assert not _same(d[0], d[1]) and not _same(d[1], d[2])  # ... which did move
    assert not _same(s[2], s[3])  # step 3: the student's SFT step on the teacher responses
    assert "sft_loss" not in recs[0] and "sft_loss" not in recs[1] and recs[2]["sft_loss"] > 0
    for r in recs:
        assert 0 <= r["d_acc"] <= 1 and np.isfinite(r["d_loss"])
        for key in ("teacher_score", "student_score", "completion_length_mean",
                    "completion_length_max", "time/rollout", "time/d_update"):
            assert np.isfinite(r[key]), key


def test_an_identical_text_scores_the_same_as_teacher_or_student(warmup):
    """Through the loop's own path (GAD.d_rows, the encoder, GAD.score): a student rollout that
    writes the teacher's text, ending in the stop token the sampler returns or cut at the length
    cap exactly like the teacher's, gets the teacher's score, bit for bit."""
    algo = warmup["algo"]
    enc, pool = algo.encoder, algo.pool
    content = enc.tokenizer("The boxes hold 3 * 4 = 12 apples.\n#### 12",
                            add_special_tokens=False)["input_ids"]
    saved = pool.teacher_ids[0]
    try:
        pool.teacher_ids[0] = np.asarray(enc.teacher_response_ids(
            "  The boxes hold 3 * 4 = 12 apples.\n#### 12 ")[0], np.int32)  # stripped + end
        assert pool.teacher_ids[0][-1] == enc.end_token_id
        cut = pool.teacher_ids[1]  # the arithmetic solutions are cut at 32 tokens, no end token
        assert len(cut) == enc.max_response_tokens and cut[-1] != enc.end_token_id
        stop = max(enc.stop_token_ids)  # any stop token the sampler may end on
        completions = [np.asarray(content + [stop], np.int32), np.asarray(content[:5], np.int32),
                       cut.copy(), np.asarray(cut[:7], np.int32)]
        rollout = Rollout(prompt_index=np.asarray([0, 0, 1, 1]), completion_ids=completions,
                          finished=np.asarray([True, False, False, False]),
                          sampler_logprobs=[np.zeros(len(c)) for c in completions])
        algo.group = 2
        rows = algo.d_rows(rollout)
        teacher, student = algo.score(algo.roles["discriminator"].params, rows)
    finally:
        pool.teacher_ids[0] = saved
        algo.group = warmup["config"].gad.num_generations
    assert rows["input_ids"].shape[:2] == (2, 3)
    np.testing.assert_array_equal(rows["input_ids"][0, 0], rows["input_ids"][0, 1])
    assert student[0] == teacher[0] and student[2] == teacher[1], (teacher, student)
    assert student[1] != teacher[0] and student[3] != teacher[1]


@pytest.fixture(scope="module")
def gad_stage(warmup, tmp_path_factory):
    wd = tmp_path_factory.mktemp("gad_stage")
    config = tiny_config(wd, **{"gad.stage": "gad", "gad.warmup_dir": str(warmup["dir"]),
                                "train.num_steps": 2, "gad.eval_examples": 4})
    gad.validate(config)
    algo = gad.GAD(config, str(wd))
    ckpt = Checkpointer.from_config(str(wd / "checkpoints"), config.checkpoint)
    algo.build_roles(ckpt, None)
    ckpt.close()
    return algo


def test_the_gad_stage_starts_from_the_warmup_checkpoint(warmup, gad_stage):
    roles = gad_stage.roles
    assert _same(roles["student"].params, warmup["student"][3])
    assert _same(roles["discriminator"].params, warmup["discriminator"][3])
    assert _same(roles["reference"].params, warmup["student"][3])  # the stage's start model
    assert roles["student"].step_count == 1 and roles["discriminator"].step_count == 3
    assert gad_stage.prompt_offset == 3  # the prompts continue where the warmup stopped


def test_the_student_is_rewarded_with_the_discriminators_pre_update_scores(gad_stage):
    algo = gad_stage
    disc = algo.roles["discriminator"]
    before = copy_params(disc.params)
    student_before = copy_params(algo.roles["student"].params)
    record, rollout = algo.step(0)
    rows = algo.d_rows(rollout)  # the same rows from the recorded rollout
    t_pre, s_pre = algo.score(before, rows)
    t_post, s_post = algo.score(disc.params, rows)
    np.testing.assert_array_equal(rollout.reward, s_pre)  # raw scores, before D's step
    np.testing.assert_array_equal(rollout.rewards["teacher_score"], np.repeat(t_pre, 2))
    assert np.abs(s_post - s_pre).max() > 1e-6  # D's step changed the scores G did not see
    groups = s_pre.reshape(-1, 2)
    adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rollout.advantages, adv.reshape(-1), rtol=1e-5, atol=1e-5)
    assert record["student_score"] == pytest.approx(float(s_pre.mean()))
    assert record["teacher_score"] == pytest.approx(float(t_pre.mean()))
    assert not _same(before, disc.params) and not _same(student_before,
                                                        algo.roles["student"].params)
    for key in ("d_loss", "d_acc", "kl", "entropy", "clip_frac", "g_loss", "reward_std",
                "completion_length_mean", "completion_length_max", "time/score",
                "time/d_update", "time/g_update", "time/rollout"):
        assert np.isfinite(record[key]), key
    assert record["ratio_mean"] == pytest.approx(1.0)  # one mini-batch: pi_old = pi


def test_checkpoint_evaluation_and_the_stopping_rule(gad_stage, tmp_path):
    ev = gad_stage.evaluator
    assert ev.metric == "accuracy" and ev.has_checker  # the arithmetic task's checker
    result = ev(gad_stage.roles["student"].params, 7)
    for key in ("rouge_l", "accuracy", "response_tokens", "truncated"):
        assert 0 <= result[key] <= (32 if key == "response_tokens" else 1), key
    saved = json.loads((Path(gad_stage.workdir) / "eval" / "step_000007.json").read_text())
    assert saved["metric"] == "accuracy" and len(saved["samples"]) == 4
    ev.patience = 2
    ev.restore([{"step": 50, "accuracy": 0.2}, {"step": 100, "accuracy": 0.5},
                {"step": 150, "accuracy": 0.4}])
    assert ev.best == {"step": 100, "accuracy": 0.5} and not ev.should_stop()
    ev._track({"step": 200, "accuracy": 0.5})  # not better
    assert not ev.improved and ev.should_stop()


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("key, value, message", [
    ("gad.reward", "d_score", r"^gad.reward: unknown config key"),
    ("gad.teacher", "gpt5", r"^gad.teacher: unknown config key"),
    ("distill.teacher_field", "x", r"^distill.teacher_field: unknown config key; did you mean "
                                   r"'distill.teacher_key'"),
    ("data.teacher_key", "x", r"^data.teacher_key: unknown config key"),
])
def test_unknown_keys_are_config_errors_naming_the_key(tmp_path, key, value, message):
    config = tiny_config(tmp_path)
    section, leaf = key.split(".")
    with config.unlocked():
        config[section][leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize("overrides, message", [
    ({"gad.stage": "adversarial"}, r"^gad.stage: 'adversarial' is not one of"),
    ({"gad.warmup_dir": "/nonexistent"}, r"^gad.warmup_dir: only the gad stage"),
    ({"gad.stage": "gad", "gad.warmup_dir": "/nonexistent"}, r"^gad.warmup_dir: '/nonexistent/"),
    ({"gad.num_generations": 3}, r"^train.batch_size: .* groups of gad.num_generations=3"),
    ({"gad.judge": {"backend": "openai", "base_url": "http://x", "model": "m", "modle": "m"}},
     r"^gad.judge.modle: unknown key"),
    ({"gad.eval_metric": "judge_score"}, r"^gad.eval_metric: 'judge_score' needs a judge"),
    ({"distill.max_response_tokens": 64}, r"^data.max_length: 128 is shorter than"),
    ({"gad.temperature": 0.0}, r"^gad.temperature: must be > 0"),
])
def test_bad_gad_configs_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        gad.validate(tiny_config(tmp_path, **overrides))


def test_distillation_files_name_the_missing_teacher_key_and_line(tmp_path):
    from sgalm_jax.algorithms.distill_data import load_distill_pool, make_encoder
    from sgalm_jax.training.tokenizer import load_tokenizer

    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"content": [{"role": "user", "content": "Hi"}],
                             "teacher_response": "Hello!"}) + "\n"
                 + json.dumps({"content": "Name a colour.", "answer": "Blue."}) + "\n")
    config = tiny_config(tmp_path, **{"data.task": "", "data.train_file": str(f),
                                      "data.chat_template": True})
    tok = load_tokenizer("builtin:tiny")
    enc = make_encoder(config, tok, end_token_id=2)
    with pytest.raises(DataError, match=rf"^{f}:2: malformed distill record: no teacher response"):
        load_distill_pool(config, tok, enc, split="train", limit=None, vocab_size=512)
    config.distill.teacher_key = "answer"
    with pytest.raises(DataError, match=rf"^{f}:1: .*missing response field 'answer'"):
        load_distill_pool(config, tok, enc, split="train", limit=None, vocab_size=512)
    config.distill.teacher_key = ""
    config.distill.skip_malformed = True
    pool = load_distill_pool(config, tok, enc, split="train", limit=None, vocab_size=512)
    assert len(pool) == 1 and pool.teacher_texts == ["Hello!"]
    assert tok.decode(pool.teacher_ids[0]) == "Hello!<|im_end|>"


# ------------------------------------------------------------------------------ CLI + resume
def _cli(workdir, cache_dir, warmup_dir, *extra, fault=None):
    env = cli_env(cache_dir, fault=fault)
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={TINY}",
           f"--config.workdir={workdir}", "--config.checkpoint.async_save=false",
           "--config.mesh.data=2", "--config.gad.stage=gad",
           f"--config.gad.warmup_dir={warmup_dir}", "--config.gad.eval_examples=0",
           "--config.metrics.tensorboard=false", *extra]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=400)


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def test_cli_gad_stage_killed_between_its_updates_resumes_bit_identically(warmup, tmp_path):
    """configs/gad_tiny.py's GAD stage from the warmup checkpoint (4 steps, checkpoints at 2 and
    4): SIGKILL after the discriminator's update of step 3 (before the student's), then the same
    command: it restores all three roles from step 2 and ends with the same rollouts, student and
    discriminator as an uninterrupted run; both exports load in transformers."""
    cache = tmp_path / "jax_cache"
    full, broken = tmp_path / "full", tmp_path / "broken"
    proc = _cli(full, cache, warmup["dir"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(full) == [2, 4]
    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["stage"] == "gad" for r in recs)

    proc = _cli(broken, cache, warmup["dir"], fault="sigkill@3:after_d")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _steps(broken) == [2]
    proc = _cli(broken, cache, warmup["dir"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in range(1, 5):
        name = f"rollout_{step:06d}.jsonl"
        assert (full / "rollouts" / name).read_text() == (broken / "rollouts" / name).read_text()
    recs = load_rollout_records(str(full / "rollouts" / "rollout_000004.jsonl"))
    assert all(r["rewards"]["teacher_score"] is not None for r in recs)

    from safetensors.numpy import load_file

    for export in ("export", "export_discriminator"):
        a = load_file(str(full / export / "model.safetensors"))
        b = load_file(str(broken / export / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{export}: {k}")

    import torch
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(str(full / "export"))
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(full / "export_discriminator"))
    assert type(clf).__name__ == "Qwen2ForSequenceClassification" and clf.config.num_labels == 1
    ids = torch.tensor([[5, 17, 99, 2], [5, 42, 7, 2]])
    with torch.no_grad():
        assert lm(ids).logits.shape == (2, 4, 512)
        hf_scores = clf(ids).logits[:, 0].numpy()
    from sgalm_jax.models import load_score_model

    ours = load_score_model(str(full / "export_discriminator"))(
        jax.numpy.asarray(ids.numpy()), jax.numpy.ones((2, 4), jax.numpy.int32))
    np.testing.assert_allclose(np.asarray(ours), hf_scores, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ fault handling
def _nan_params(params):
    """``params`` with every entry of their first leaf NaN: every loss and score is NaN."""
    leaves, tree = jax.tree.flatten(params)
    leaves[0] = leaves[0] * np.nan
    return jax.tree.unflatten(tree, leaves)


def test_a_nan_discriminator_stops_the_step_naming_it(warmup):
    """train.nonfinite='error': the guard the loop hands each update to names the step and role
    (the loop checks it before every save and export)."""
    from sgalm_jax.errors import NonFiniteError
    from sgalm_jax.training.finite import FiniteGuard

    algo = warmup["algo"]
    disc = algo.roles["discriminator"]
    good = copy_params(disc.params)
    disc.state = dataclasses.replace(disc.state, params=_nan_params(disc.state.params))
    finite = FiniteGuard("error")
    try:
        algo.step(0, finite)
        with pytest.raises(NonFiniteError, match=r"^step 1 \(discriminator\): loss = nan, "
                                                 r"grad_norm = nan: the run diverged"):
            finite.check()
    finally:
        disc.state = dataclasses.replace(disc.state, params=good)


def test_skip_mode_skips_nan_updates_then_stops_and_closes_the_checkpointer(tmp_path,
                                                                           monkeypatch):
    """train.nonfinite='skip' with a NaN discriminator: its updates are skipped (logged), the
    run stops after train.max_skipped_steps consecutive ones naming the step; the diverged step is
    neither saved nor exported, and the run's checkpointer is closed on the way out."""
    from sgalm_jax.errors import NonFiniteError
    from sgalm_jax.training import checkpoint

    init = gad.GAD._init_discriminator
    monkeypatch.setattr(gad.GAD, "_init_discriminator", lambda self: _nan_params(init(self)))
    config = tiny_config(tmp_path, **{"gad.d_only_steps": 3, "train.num_steps": 3,
                                      "train.nonfinite": "skip", "train.max_skipped_steps": 1,
                                      "checkpoint.every_steps": 1})
    with pytest.raises(NonFiniteError, match=r"^step 2 \(discriminator\): .*2 consecutive "
                                             r"steps were skipped"):
        gad.run(config, str(tmp_path))
    assert not list(checkpoint._OPEN)
    # Step 1's skipped update kept the (start) params, which were saved; step 2 never was.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
    assert not (tmp_path / "export").exists()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and np.isnan(first["d_loss"])


# ------------------------------------------------------------------------------ SeqKD
def test_seqkd_trains_sft_on_the_pairs_gads_warmup_uses(warmup, tmp_path):
    """configs/seqkd_tiny.py (sft with sft.distill): its examples are GAD's warmup SFT rows,
    prompt + teacher response cut the same way, the loss on the response; it trains and exports."""
    from sgalm_jax.algorithms import sft
    from sgalm_jax.training.tokenizer import load_tokenizer

    config = load_config_file("seqkd_tiny.py", str(REPO / "configs" / "seqkd_tiny.py"))
    config.workdir = str(tmp_path)
    config.metrics.tensorboard = False
    config.train.batch_size = 8
    config.train.num_steps = 2
    sft.validate(config)
    tok = load_tokenizer("builtin:tiny")
    examples = sft.distill_examples(config, tok, eos_id=2, stop_ids=(), vocab_size=512)
    algo = warmup["algo"]
    rows = algo.sft_rows(Rollout(prompt_index=np.asarray([0, 0, 5, 5]), completion_ids=[],
                                 finished=np.zeros(0, bool), sampler_logprobs=[]))
    for row, i in zip(range(2), (0, 5)):
        n = int(rows["attention_mask"][row].sum())
        np.testing.assert_array_equal(examples[i].input_ids, rows["input_ids"][row, :n])
        np.testing.assert_array_equal(examples[i].loss_mask, rows["loss_mask"][row, :n])
    out = sft.run(config, str(tmp_path))
    assert out["step"] == 2 and np.isfinite(out["loss"])
    assert (tmp_path / "export" / "config.json").exists()
