"""Metric writers: ``metrics.jsonl``, TensorBoard events (tensorboardX), a tqdm progress bar; MFU.

Only process 0 writes files. Every record is ``{"step": N, "time": unix_seconds, name: value...}``.
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from typing import Any, Mapping

import jax
import numpy as np

# Peak dense bf16 FLOP/s per device (chip for TPU, GPU otherwise), by substring of
# ``jax.devices()[0].device_kind`` (lowercase). Order matters: first match wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),  # SXM; the PCIe part is lower (756e12)
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str | None = None, override_tflops: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one device, from ``override_tflops`` or the table (None if unknown)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    if "h100" in kind and "pcie" in kind:
        return 756e12
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def train_flops_per_token(num_params: int) -> float:
    """The usual 6 * N estimate of training FLOPs per token (forward + backward)."""
    return 6.0 * num_params


def mfu(num_params: int, tokens_per_sec: float, num_devices: int, peak_per_device: float | None
        ) -> float | None:
    """Model FLOPs utilisation: 6 * params * tokens/s / (devices * peak)."""
    if not peak_per_device:
        return None
    return train_flops_per_token(num_params) * tokens_per_sec / (num_devices * peak_per_device)


def _scalar(v: Any) -> float | int | None:
    try:
        a = np.asarray(v)
    except Exception:
        return None
    if a.size != 1:
        return None
    x = a.reshape(()).item()
    if isinstance(x, float) and not math.isfinite(x):
        return float(x)
    return x


_OPEN: "weakref.WeakSet[MetricsWriter]" = weakref.WeakSet()


def close_all_writers() -> None:
    """Close every MetricsWriter still open (``main`` calls this on error paths: TensorBoard's
    background thread must not outlive the error message)."""
    for writer in list(_OPEN):
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - closing after an error must not raise another
            pass


class MetricsWriter:
    """Writes scalar metrics to ``workdir/metrics.jsonl``, TensorBoard and a progress bar."""

    def __init__(self, workdir: str, *, total_steps: int | None = None, initial_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True,
                 bar_keys: tuple[str, ...] = ("loss", "tokens_per_sec", "step_time")):
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        self.bar_keys = bar_keys
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.is_main:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        _OPEN.add(self)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=workdir, flush_secs=10)
        if progress_bar and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                             desc="train")

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
        """Record scalar ``metrics`` at ``step`` (non-scalars are skipped); returns the record."""
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in metrics.items():
            x = _scalar(value)
            if x is not None:
                record[f"{prefix}{name}"] = x
        if not self.is_main:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, x in record.items():
                if name not in ("step", "time") and isinstance(x, (int, float)):
                    self._tb.add_scalar(name, x, global_step=int(step))
        if self._bar is not None:
            shown = {k: record[k] for k in self.bar_keys if k in record}
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                   for k, v in shown.items()}, refresh=False)
            self._bar.n = int(step)
            self._bar.refresh()
        return record

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text record in TensorBoard (e.g. samples); also appended to metrics.jsonl."""
        if not self.is_main:
            return
        self._jsonl.write(json.dumps({"step": int(step), tag: text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        """Close the bar, TensorBoard and the JSONL file (all of them, even if one fails)."""
        _OPEN.discard(self)
        first_error = None
        for name in ("_bar", "_tb", "_jsonl"):
            obj = getattr(self, name)
            setattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except OSError as e:  # e.g. a full disk when flushing
                    first_error = first_error or e
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is on its way already: do not mask it
            self.close()
        except OSError:
            pass


class StepTimer:
    """Wall time and token throughput between consecutive ``tick`` calls (for logging)."""

    def __init__(self, num_params: int, *, peak_per_device: float | None = None,
                 num_devices: int | None = None):
        self.num_params = num_params
        self.peak = peak_per_device
        self.num_devices = num_devices or jax.device_count()
        self._last = time.perf_counter()
        self._tokens = 0
        self._steps = 0

    def add(self, tokens: int, steps: int = 1) -> None:
        self._tokens += int(tokens)
        self._steps += steps

    def tick(self) -> dict[str, float]:
        """Throughput since the previous tick (call after blocking on the step's outputs)."""
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        out = {"step_time": dt / max(self._steps, 1), "tokens_per_sec": self._tokens / dt}
        util = mfu(self.num_params, out["tokens_per_sec"], self.num_devices, self.peak)
        if util is not None:
            out["mfu"] = util
        self._last, self._tokens, self._steps = now, 0, 0
        return out

    def reset(self) -> None:
        self._last, self._tokens, self._steps = time.perf_counter(), 0, 0
