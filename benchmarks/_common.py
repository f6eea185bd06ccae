"""Helpers shared by the benchmarks: the model from its Gin file, and the pieces of the races
against Hugging Face `transformers` on the same weights (`ssr_generate.py`, `decode.py`,
`train_step.py`)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import gin
import jax
import numpy as np

# glibc malloc settings that keep freed host memory in the process (one arena on the brk heap,
# no mmap'd chunks, no trimming), so that a train step's multi-GB temporaries reuse pages
# instead of being unmapped and faulted in again at every step. See RESULTS.md ("Host memory").
RETAINED_HOST_MALLOC = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}
GLIBC_DEFAULTS_ENV = "E2S2_BENCH_GLIBC_MALLOC_DEFAULTS"


def retain_freed_host_memory() -> None:
    """Re-executes this script with `RETAINED_HOST_MALLOC` in its environment (glibc reads
    them only at start-up), unless they are set already, or `E2S2_BENCH_GLIBC_MALLOC_DEFAULTS=1`
    asks for glibc's defaults. Every contender of the run (JAX and torch) gets the same
    allocator. Call first thing in `if __name__ == "__main__":`."""
    if os.environ.get(GLIBC_DEFAULTS_ENV) == "1" or platform.system() != "Linux":
        return
    if all(os.environ.get(k) == v for k, v in RETAINED_HOST_MALLOC.items()):
        return
    os.environ.update(RETAINED_HOST_MALLOC)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def host_malloc() -> dict[str, str] | str:
    """The glibc malloc settings this process started with (or "glibc defaults"), for the JSON
    report."""
    names = [*RETAINED_HOST_MALLOC, GLIBC_DEFAULTS_ENV]
    return {name: os.environ[name] for name in names if name in os.environ} or "glibc defaults"


def model_config(gin_files: Sequence[str], bindings: Sequence[str] = ()):
    """The `T5Config` that the model Gin files' `MODEL_CONFIG` macro describes, after
    `bindings` (e.g. `ACTIVATION_DTYPE = "bfloat16"`). Leaves Gin's config empty.

    Registers only `T5Config` with Gin (under the name `e2s2_jax/configurables.py` gives it), so
    that benchmarks run without TensorFlow, on an accelerator image too.
    """
    from e2s2_jax.models.config import T5Config

    gin.external_configurable(T5Config, module="e2s2_jax")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
        return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    finally:
        gin.clear_config()


def load_model(gin_files: Sequence[str], bindings: Sequence[str] = ()):
    """A plain `T5` of `model_config(gin_files, bindings)`."""
    from e2s2_jax.models.t5 import T5

    return T5(model_config(gin_files, bindings))


def time_train_steps(settings: dict, batch, mesh, optimizer, steps: int, rounds: int):
    """Compiles a jitted train step (Adafactor or `optimizer`) for each `{name: (model,
    objective)}`, warms it up, then times `steps` steps per round, the settings alternating
    within each of `rounds` rounds (other load on a shared machine slows all alike). Returns
    `(seconds per step per round {name: [...]}, compile seconds {name: s}, XLA's FLOP count of
    each compiled step {name: flops or None}, final states {name: state})`."""
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    runners, compile_seconds, flops = {}, {}, {}
    for name, (model, objective) in settings.items():
        state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
        step = make_train_step(model, optimizer, objective, mesh, state_shardings=shardings)
        start = time.perf_counter()
        compiled = step.lower(state, batch, jax.random.key(1)).compile()
        compile_seconds[name] = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops[name] = float(cost["flops"]) if cost and "flops" in cost else None
        for _ in range(2):  # warm-up; the second step grows the retained heap to its peak
            state, metrics = step(state, batch, jax.random.key(1))
        jax.block_until_ready(metrics)
        runners[name] = [step, state]
    timings: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, runner in runners.items():
            step, state = runner
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch, jax.random.key(1))
            jax.block_until_ready((state, metrics))
            timings[name].append((time.perf_counter() - start) / steps)
            runner[1] = state
    return timings, compile_seconds, flops, {name: r[1] for name, r in runners.items()}


def hf_model_from_params(config, params, prefix: str = "hf-bench-"):
    """`T5ForConditionalGeneration` (eval mode) loaded from `params` exported with `export_hf`
    to a temporary directory: the same float32 weights on both sides."""
    import transformers

    from e2s2_jax.interop.hf import export_hf

    with tempfile.TemporaryDirectory(prefix=prefix) as hf_dir:
        export_hf(config, jax.device_get(params), hf_dir)
        return transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()


def rows_identical(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Fraction of rows of two `[batch, length]` token arrays that agree on their common width."""
    width = min(ours.shape[1], theirs.shape[1])
    return float(np.mean(np.all(ours[:, :width] == theirs[:, :width], axis=1)))


def alternate(
    fns: dict[str, Callable[[], object]], rounds: int, *, rotate: bool = False
) -> dict[str, list[float]]:
    """Seconds of each no-argument call per round, the contenders taking turns within a round
    (so that load from other processes on a shared machine falls on all alike). Calls must
    return host values (block on device work themselves). With `rotate`, round r starts at
    contender r (mod their number), so that no contender always runs right after the same
    other one: a JAX step run right after a torch step is slowed by it (measured: the same
    T5-small step, 9.97 s there against 7.39 s after another JAX step)."""
    names = list(fns)
    seconds = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float], work: float | None = None) -> dict:
    """Median, spread (min, max) and all rounds of `seconds`; with `work` (e.g. tokens), the
    median rate `work / median seconds` too."""
    median = statistics.median(seconds)
    result = {
        "median_s": round(median, 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "rounds_s": [round(s, 4) for s in seconds],
    }
    if work is not None:
        result["per_s"] = round(work / median, 1)
    return result


def environment(torch_threads: int) -> dict:
    """The machine, library versions and thread counts, for the JSON report."""
    import torch
    import transformers

    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch_threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "host_malloc": host_malloc(),
    }
