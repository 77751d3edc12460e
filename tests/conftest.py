"""Shared test setup: 8 simulated CPU devices, offline HF, tiny random models built once per session.

The XLA flag must be set before jax initialises its backend, so it lives here, at the top of the
conftest that pytest imports first.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

def pytest_collection_modifyitems(config, items):
    """The slow modules (multi-host runs, minutes each) first: under ``pytest -n 2 --dist
    loadfile`` (README's test command) one worker starts on them while the other takes the rest,
    instead of one worker finishing them alone at the end."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)  # stable sort


# Small shapes shared by every test module so jit caches are reused.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)

# The four reference architectures of the parity tests.
FAMILIES = {
    # Qwen2 (tied), q/k/v bias.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, explicit head_dim != hidden / heads.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=24)),
    # Llama 3.2 style: llama3 RoPE scaling, tied head.
    "llama32": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    # Mistral (Zephyr's base): Llama tensors, sliding-window attention (small, so tests reach it).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=96, head_dim=16)),
    # Llama 3.1 style: untied head, llama3 scaling with factor 8.
    "llama31": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256})),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random transformers model (eval mode, fp32) of ``family`` with non-trivial weights."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # perturb norms and biases too, so a missing tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """``hf_model_dir(family)`` -> directory of a saved tiny random HF checkpoint (cached)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"hf_{family}")
            make_hf_model(family).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_tokenizer(shared_data):
    """The real Qwen2.5 tokenizer from ../shared/data/tokenizers (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5")


def _mount_tmpfs(path: Path, options: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


@pytest.fixture
def small_tmpfs(tmp_path):
    """``small_tmpfs(size)`` -> a folder on a fresh tmpfs of ``size`` (e.g. '3m'): a real full
    disk. Skips where tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN)."""
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        if not _mount_tmpfs(path, f"size={size}"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        _umount(path)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write: a read-only tmpfs as root (root ignores file modes), a
    ``chmod 555`` folder otherwise."""
    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if not _mount_tmpfs(path, "size=1m,ro"):
        pytest.skip("cannot mount a read-only tmpfs here")
    yield path
    _umount(path)


@pytest.fixture(scope="session")
def jail_sandbox_factory():
    """Makes sandboxes in the bubblewrap jail (``isolation="bwrap"``). Where bwrap cannot start the
    test is skipped, except under CI (``CI`` set), where the jail is required and its absence fails."""
    import dataclasses

    from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig, SandboxUnavailable

    def make(config: SandboxConfig | None = None, **kwargs):
        try:
            return Sandbox(dataclasses.replace(config or SandboxConfig(), isolation="bwrap"), **kwargs)
        except SandboxUnavailable as e:
            if os.environ.get("CI"):
                pytest.fail(f"the bubblewrap jail must work in CI (.ci/run installs bubblewrap): {e}")
            pytest.skip(str(e))

    return make


def cli_env(cache_dir: Path | str, *, devices: int = 2, fault: str | None = None) -> dict[str, str]:
    """The environment of a ``python -m sgalm_jax.main`` subprocess in a CLI test: ``devices``
    simulated CPU devices, a persistent compilation cache shared by a test's runs, offline HF,
    quiet logs, and ``$SGALM_FAULT_INJECT`` set to ``fault`` (or unset)."""
    env = dict(os.environ)
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                "HF_HUB_OFFLINE": "1", "SGALM_LOG_LEVEL": "WARNING"})
    env.pop("SGALM_FAULT_INJECT", None)
    if fault:
        env["SGALM_FAULT_INJECT"] = fault
    return env
