"""Evaluate a checkpoint on MBPP (test, task ids 11-510): pass@1, generated code run in the sandbox.

    python -m sgalm_jax.main --config configs/eval_mbpp.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/eval_qwen3b_mbpp

The MBPP paper's 3-shot prompt (demos from task ids 1-10; code between ``[BEGIN]`` and ``[DONE]``),
greedy decoding. pass@k: ``--config.eval.num_samples=10 --config.eval.temperature=0.8`` reports
pass@1 and pass@10 (unbiased estimator). Instruct models: ``--config.eval.chat=true
--config.eval.k_shot=0`` (the answer is the first ```python block). ``model.path`` may be a run
directory. Offline data: ``--config.eval.data_dir=../shared/data``.

Mesh: the batch is sharded over every device; 3B in bf16 fits one 80 GB GPU or a TPU chip.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("eval_gsm8k.py", __file__)
    config.eval.tasks = "mbpp"
    config.eval.k_shot = 3
    config.eval.sandbox_workers = 0  # min(8, 2 x CPUs)
    return config
