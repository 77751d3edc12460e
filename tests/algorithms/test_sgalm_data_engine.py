"""The synthetic-data engine end to end on tiny models: generation (Self-Instruct with the ROUGE-L
filter; SGALM's samples reused from disk), test-split deduplication, the JSONL records, the
student's SFT and evaluation, and the results table."""

from __future__ import annotations

import json

from sgalm_jax.algorithms import data_engine
from sgalm_jax.algorithms.sgalm_data import Sample, save_samples
from sgalm_jax.config import base_config
from sgalm_jax.data import get_task


def test_data_engine_pipeline(tmp_path):
    config = base_config()
    config.algorithm = "data_engine"
    config.workdir = str(tmp_path)
    config.model.init = "tiny-qwen2"  # a random generator: Self-Instruct writes only noise
    config.tokenizer.path = "builtin:tiny"
    config.data.task = "arithmetic"
    config.data.max_examples = 8
    config.data.max_length = 256
    config.data.min_bucket = 64
    config.sgalm.num_shots = 2
    config.sgalm.max_new_tokens = 16
    config.sgalm.sample_batch_size = 16
    config.metrics.progress_bar = config.metrics.tensorboard = False
    de = config.data_engine
    de.methods, de.scales = "sgalm,self_instruct", "1"
    de.self_instruct_seeds, de.self_instruct_generated = 2, 1
    de.student_init = "tiny-qwen2"
    de.baseline_real_only = False
    de.epochs = 1.0
    config.train.batch_size = 8
    config.optimizer.learning_rate = 1e-3
    config.eval.tasks, config.eval.max_examples, config.eval.max_new_tokens = "arithmetic", 2, 8
    config.eval.batch_size = 8
    data_engine.validate(config)

    # SGALM's samples as if generated earlier: 6 well-formed new ones, 1 copy of a test sample,
    # 1 malformed.
    task = get_task("arithmetic")
    new = [task.sample_text(e) for e in task.load("validation", limit=6)]
    test_copy = task.sample_text(task.load("test", limit=1)[0])
    texts = new + [test_copy, "Question: broken"]
    save_samples(str(tmp_path / "synthetic" / "sgalm.jsonl"),
                 [Sample(index=i, prompt="p", completion_ids=[1], text=t, stopped=True)
                  for i, t in enumerate(texts)])

    out = data_engine.run(config, str(tmp_path))
    rows = {r["method"]: r for r in out["rows"]}
    sg = rows["sgalm"]
    assert (sg["generated"], sg["malformed"], sg["test_overlap"], sg["kept"]) == (8, 1, 1, 6)
    records = [json.loads(l) for l in (tmp_path / "synthetic" / "sgalm_k1.jsonl").open()]
    assert len(records) == 8 + 6  # the real pool (mix_real) + the kept synthetic samples
    assert records[-1]["prompt"].startswith("Question:") and "####" in records[-1]["response"]
    assert sg["steps"] == 2 and "arithmetic" in sg["eval"]
    assert (tmp_path / "students" / "sgalm_k1" / "export" / "config.json").exists()
    assert (tmp_path / "students" / "sgalm_k1" / "eval" / "results.json").exists()
    si = rows["self_instruct"]  # the random generator's samples are all malformed
    assert si["kept"] == 0 and si["synthetic"] == 0
    assert (tmp_path / "synthetic" / "self_instruct.jsonl").exists()
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| method | k | synthetic") and "| sgalm | 1 | 6 |" in table
