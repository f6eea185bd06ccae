"""Train and eval metrics: TensorBoard event files, a JSON-lines copy, and the console line.

Only process 0 writes. Files under MODEL_DIR: `train/` and `eval/` (TensorBoard event files),
`train_metrics.jsonl` and `eval_metrics.jsonl` (one JSON object per logged step).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax

# Peak dense bf16 FLOP/s per chip, for MFU. Devices not listed (CPUs) report no MFU.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops(devices=None) -> float | None:
    """Summed peak FLOP/s of `devices` (all devices by default), None when any is unknown."""
    devices = jax.devices() if devices is None else devices
    peaks = [PEAK_FLOPS_PER_DEVICE.get(d.device_kind) for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return float(sum(peaks))


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class MetricsWriter:
    """Writes scalars for `split` ("train" or "eval"): TensorBoard event files under
    MODEL_DIR/`split` through `clu.metric_writers.SummaryWriter` (t5x's writer), and one JSON
    line per write to MODEL_DIR/`split`_metrics.jsonl; both flushed at every write."""

    def __init__(self, model_dir: str, split: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        self._jsonl = None
        if enabled:
            # clu's writers import TensorFlow: loaded here, not with the module, so that
            # `peak_flops` and `Throughput` import without it (benchmarks/train_step.py).
            from clu import metric_writers

            self._tensorboard = metric_writers.SummaryWriter(os.path.join(model_dir, split))
            self._jsonl = open(os.path.join(model_dir, f"{split}_metrics.jsonl"), "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._tensorboard.write_scalars(step, scalars)
        self._tensorboard.flush()
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}))
        self._jsonl.write("\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


class Throughput:
    """Tokens/s, MFU and ETA between two log points.

    `tokens_per_step`: non-pad tokens the model reads per step (inputs + targets of the global
    batch, counted from the batch); `flops_per_step`: model FLOPs of a step (`training.flops`).
    """

    def __init__(self, total_steps: int, flops_per_step: float | None, peak: float | None):
        self.total_steps = total_steps
        self.flops_per_step = flops_per_step
        self.peak = peak
        self._last_time = time.perf_counter()
        self._last_step: int | None = None
        self._tokens = 0.0

    def add_tokens(self, tokens: float) -> None:
        self._tokens += tokens

    def reset(self, step: int) -> None:
        """Starts a new interval at `step` (after compilation, restore or evaluation)."""
        self._last_time = time.perf_counter()
        self._last_step = step
        self._tokens = 0.0

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._last_step is not None and step > self._last_step:
            seconds = now - self._last_time
            steps = step - self._last_step
            out["steps_per_second"] = steps / seconds
            out["tokens_per_second"] = self._tokens / seconds
            if self.flops_per_step and self.peak:
                out["mfu"] = self.flops_per_step * steps / seconds / self.peak
            out["eta_seconds"] = (self.total_steps - step) * seconds / steps
        self.reset(step)
        return out


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """`step 120/1000 | loss 4.812 cross_entropy 4.80 ... | lr 1.0e-02 | 5.3k tok/s | ...`."""
    skip = {"learning_rate", "steps_per_second", "tokens_per_second", "mfu", "eta_seconds"}
    names = sorted((n for n in scalars if n not in skip), key=lambda n: (n != "loss", n))
    terms = " ".join(f"{name} {scalars[name]:.4g}" for name in names)
    parts = [f"step {step}/{total_steps}", terms]
    if "learning_rate" in scalars:
        parts.append(f"lr {scalars['learning_rate']:.2e}")
    if "tokens_per_second" in scalars:
        parts.append(f"{scalars['tokens_per_second'] / 1e3:.1f}k tok/s")
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if "eta_seconds" in scalars and math.isfinite(scalars["eta_seconds"]):
        parts.append(f"ETA {_format_seconds(scalars['eta_seconds'])}")
    return " | ".join(parts)
