"""benchmarks/memory_plan.py: per-device bytes of the ahead-of-time compiled train step.

The plan runs in a subprocess on 8 simulated CPU devices (this file run as a script; see
tests/eight_devices.py) for a tiny T5 1.1 widened to d_model 128 / d_ff 256, so that Adafactor
factors some of its second moments (it factors matrices whose two largest dims are >= 128).
References are computed here from the T5 1.1 architecture, not from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import sys

import eight_devices
import pytest

MiB = 1024**2
FSDP = 8
SIZES = {
    "vocab": 8192,  # gin/models/t5_1_1_tiny.gin
    "d_model": 128,
    "d_ff": 256,
    "heads": 4,
    "d_kv": 16,
    "layers": 2,
    "buckets": 32,
}
BINDINGS = (f"T5Config.d_model = {SIZES['d_model']}", f"T5Config.d_ff = {SIZES['d_ff']}")
BUDGETS = {"small": 48 * MiB}  # one budget: each compile takes ~10 s on 2 cores
INPUTS_LENGTH, TARGETS_LENGTH, BATCH = 128, 32, 2


def t5_1_1_param_shapes() -> list[tuple[tuple[int, ...], int | None]]:
    """`(shape, index of the d_model dimension or None)` of every T5 1.1 parameter, with layers
    stacked on a leading axis (scan_layers) and an untied output projection."""
    v, d, f = SIZES["vocab"], SIZES["d_model"], SIZES["d_ff"]
    h, k, n = SIZES["heads"], SIZES["d_kv"], SIZES["layers"]
    in_projection = ((n, d, h * k), 1)  # query, key, value: [layers, embed, joined_kv]
    out_projection = ((n, h * k, d), 2)
    attention = [in_projection] * 3 + [out_projection]
    mlp = [((n, d, f), 1), ((n, d, f), 1), ((n, f, d), 2)]
    norm = ((n, d), 1)
    encoder = attention + mlp + [norm] * 2 + [((d,), 0), ((SIZES["buckets"], h), None)]
    decoder = attention * 2 + mlp + [norm] * 3 + [((d,), 0), ((SIZES["buckets"], h), None)]
    return [((v, d), 1), ((d, v), 0), *encoder, *decoder]


def shard_elements(shape: tuple[int, ...], embed_dim: int | None) -> int:
    """Elements per device when the d_model dimension is split over fsdp (all divide by 8)."""
    size = math.prod(shape)
    return size // FSDP if embed_dim is not None else size


def adafactor_elements(shape: tuple[int, ...], embed_dim: int | None) -> int:
    """Per-device elements of Adafactor's second-moment state for one parameter (Shazeer &
    Stern 2018): row and column statistics over the two largest dims when both are >= 128,
    else the full [shape] accumulator; plus the one-element placeholders optax keeps for the
    unused slots (v for factored, v_row and v_col for unfactored parameters)."""
    if len(shape) >= 2:
        second, largest = sorted(range(len(shape)), key=lambda i: (shape[i], i))[-2:]
        if shape[second] >= 128:
            total = 1
            for dropped in (largest, second):
                kept = tuple(s for i, s in enumerate(shape) if i != dropped)
                kept_embed = None if embed_dim in (None, dropped) else embed_dim
                total += shard_elements(kept, kept_embed)
            return total
    return shard_elements(shape, embed_dim) + 2


def worker() -> dict:
    from benchmarks import memory_plan

    memory_plan.ensure_host_devices(FSDP)
    row = memory_plan.plan_row(
        os.path.join(memory_plan.REPO_ROOT, "gin", "models", "t5_1_1_tiny.gin"),
        (1, FSDP, 1),
        batch_per_device=BATCH,
        inputs_length=INPUTS_LENGTH,
        targets_length=TARGETS_LENGTH,
        budgets=BUDGETS,
        gin_bindings=BINDINGS,
    )
    return {"row": row, "backend": memory_plan.jax.default_backend()}


@pytest.fixture(scope="module")
def planned():
    return eight_devices.run_worker(__file__, "worker")


def test_parameter_and_optimizer_bytes_match_the_architecture(planned):
    row = planned["row"]
    shapes = t5_1_1_param_shapes()
    assert row["parameters"] == sum(math.prod(shape) for shape, _ in shapes)
    assert row["param_bytes"] == 4 * sum(shard_elements(*entry) for entry in shapes)
    # The relative-position tables are the only replicated params; all else is split 8 ways.
    relpos = 2 * SIZES["buckets"] * SIZES["heads"]
    assert row["param_bytes"] == 4 * ((row["parameters"] - relpos) // FSDP + relpos)
    adafactor = 4 * sum(adafactor_elements(*entry) for entry in shapes)
    # Plus optax's int32 step counters (Adafactor's and the schedule's).
    assert 0 <= row["optimizer_bytes"] - adafactor <= 16
    assert row["optimizer_bytes"] < 0.6 * row["param_bytes"]  # factoring pays off
    assert row["gradient_bytes"] == row["param_bytes"]


def test_xla_arguments_are_the_sharded_state_and_batch(planned):
    row = planned["row"]
    xla = row["xla"]
    rows_per_device = BATCH  # the global batch is BATCH * 8, split 8 ways
    batch_bytes = 4 * rows_per_device * (2 * INPUTS_LENGTH + 4 * TARGETS_LENGTH)
    state = row["param_bytes"] + row["optimizer_bytes"]
    # jit prunes arguments the step never reads (some of optax's placeholders): up to 1 KiB.
    assert state + batch_bytes - 1024 <= xla["argument_bytes"] <= state + batch_bytes + 16
    # The donated state is updated in place: (nearly) the whole output aliases the arguments.
    assert state - 1024 <= xla["alias_bytes"] <= state + 16
    # What is left are the step's metric scalars (the objective's loss terms and normaliser,
    # grad_norm, nonfinite, learning_rate), each its own output buffer; XLA:CPU reports 1024
    # bytes for them here (128 apiece, its buffer alignment), so this allows twice that.
    assert 0 < xla["output_bytes"] - xla["alias_bytes"] <= 16 * 128
    assert row["total_bytes"] == (
        xla["argument_bytes"] + xla["output_bytes"] - xla["alias_bytes"] + xla["temp_bytes"]
    )
    assert planned["backend"] == "cpu"


def test_temp_bytes_grow_with_the_batch(planned):
    compiled = planned["row"]["compiled"]
    batches = [point["batch_per_device"] for point in compiled]
    temps = [point["temp_bytes"] for point in compiled]
    assert len(batches) >= 4 and batches == sorted(batches)
    assert all(later > earlier for earlier, later in zip(temps, temps[1:], strict=False))
    # At least one bfloat16 logits tensor [targets, vocab] per example stays alive.
    per_example = planned["row"]["linear_fit"]["bytes_per_example"]
    assert per_example >= TARGETS_LENGTH * SIZES["vocab"] * 2


def test_max_batch_fits_and_one_more_does_not(planned):
    row = planned["row"]
    totals = {point["batch_per_device"]: point["total_bytes"] for point in row["compiled"]}
    for label, budget in BUDGETS.items():
        found = row["max_batch_per_device"][label]
        assert found["verified"]
        best = found["max_batch"]
        assert best > 2 * BATCH  # the search went past the two fitted batch sizes
        assert totals[best] <= budget < totals[best + 1]
        assert abs(found["linear_fit_prediction"] - best) <= max(2, best // 10)


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
