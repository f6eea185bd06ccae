"""The jitted train step: same numbers on 1 and 8 devices, gradient accumulation, errors.

Tests that need 8 devices run their body in a subprocess (this file run as a script) with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`. Why a subprocess rather than setting the
flag here or in a conftest: XLA reads the flag once, when the first test module that touches jax
initialises the backend, so an in-process setting depends on test order and would silently give
every other test module 8 devices too. A subprocess always gets exactly 8 and leaves the pytest
process alone. One subprocess computes everything and the tests assert on its JSON report.
"""

from __future__ import annotations

import json
import sys

import eight_devices
import numpy as np
import pytest

MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8), (4, 2, 1)]
NUM_STEPS = 3


def tiny_config(**overrides):
    from e2s2_jax.models.config import T5Config

    sizes = dict(
        vocab_size=64,
        d_model=16,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dtype="float32",
    )
    sizes.update(overrides)
    return T5Config(**sizes)


def synthetic_batch(seed: int, batch_size: int = 16, length: int = 8) -> dict[str, np.ndarray]:
    """Random tokens with a random amount of padding per row (so rows weigh differently)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, 64, (batch_size, length)).astype(np.int32)
    target_lengths = rng.integers(1, length + 1, (batch_size,))
    valid = np.arange(length)[None, :] < target_lengths[:, None]
    targets = np.where(valid, targets, 0).astype(np.int32)
    decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    encoder_inputs = rng.integers(2, 64, (batch_size, length)).astype(np.int32)
    encoder_inputs[:, -2:] = 0
    return {
        "encoder_input_tokens": encoder_inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": valid.astype(np.int32),
    }


def _worker_train_steps() -> dict:
    """Runs in the 8-device subprocess; returns a JSON-able report."""
    import jax
    import optax

    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import optimizers, partitioning
    from e2s2_jax.training.train_state import init_train_state, train_state_shardings
    from e2s2_jax.training.train_step import make_train_step

    assert jax.device_count() == 8, jax.devices()
    report: dict = {"meshes": {}}
    # A realistic step size (t5x: 0.01 after warm-up). With steps as large as the params
    # themselves (lr ~0.3), Adafactor's normalisation amplifies float32 reduction-order
    # rounding to ~1e-5 relative after 3 steps; at this size the runs agree to ~1e-7.
    schedule = optimizers.rsqrt_schedule(0.01 * np.sqrt(10), warmup_steps=10)
    optimizer = optimizers.make_optimizer(
        "adafactor", schedule, min_dim_size_to_factor=8, gradient_clip_norm=1.0
    )
    batches = [synthetic_batch(seed) for seed in range(NUM_STEPS)]
    single_device = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])

    def run(model, mesh, initial_state):
        # Every run starts from the same host copy of the initial state (sharded init itself
        # is tested in test_partitioning), so only the train step differs.
        _, shardings = train_state_shardings(model, optimizer, mesh)
        state = jax.device_put(initial_state, shardings)
        step = make_train_step(
            model,
            optimizer,
            Seq2SeqObjective(z_loss=1e-4, label_smoothing=0.1),
            mesh,
            learning_rate_fn=schedule,
            state_shardings=shardings,
        )
        losses = []
        for batch in batches:
            state, metrics = step(state, batch, jax.random.key(42))
            losses.append({k: float(v) for k, v in metrics.items()})
        params = jax.tree.map(np.asarray, jax.device_get(state.params))
        return losses, params, int(state.step)

    def compare(name, model, mesh, initial_state, reference):
        reference_losses, reference_params = reference
        losses, params, step = run(model, mesh, initial_state)
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference_params)
        report["meshes"][name] = {
            "losses": losses,
            "reference_losses": reference_losses,
            "max_param_diff": max(jax.tree.leaves(diffs)),
            "max_param": max(float(np.abs(b).max()) for b in jax.tree.leaves(reference_params)),
            "step": step,
        }

    model = T5(tiny_config())
    state, _ = init_train_state(model, optimizer, single_device, jax.random.key(0))
    initial_state = jax.device_get(state)
    reference_losses, reference_params, _ = run(model, single_device, initial_state)
    for mesh_shape in MESHES:
        mesh = partitioning.create_mesh(*mesh_shape)
        name = "x".join(map(str, mesh_shape))
        compare(name, model, mesh, initial_state, (reference_losses, reference_params))

    # Dropout on (one mesh, compiling dropout is slow on CPU): masks drawn from the folded key
    # must not depend on how the batch is laid out across devices.
    dropout_model = T5(tiny_config(dropout_rate=0.1))
    dropout_reference = run(dropout_model, single_device, initial_state)[:2]
    compare(
        "2x2x2+dropout",
        dropout_model,
        partitioning.create_mesh(2, 2, 2),
        initial_state,
        dropout_reference,
    )

    # Gradient accumulation: plain SGD so the update is the gradient itself, dropout off.
    sgd_model = T5(tiny_config())
    sgd = optax.sgd(1.0)
    batch = synthetic_batch(7, batch_size=16)
    mesh = partitioning.create_mesh(2, 2, 2)
    accumulation = {}
    sgd_initial_state = jax.device_get(
        init_train_state(sgd_model, sgd, single_device, jax.random.key(3))[0]
    )
    _, shardings = train_state_shardings(sgd_model, sgd, mesh)
    for num_microbatches in (1, 4):
        state = jax.device_put(sgd_initial_state, shardings)
        step = make_train_step(
            sgd_model,
            sgd,
            Seq2SeqObjective(z_loss=1e-4),
            mesh,
            num_microbatches,
            state_shardings=shardings,
        )
        before = jax.tree.map(np.asarray, jax.device_get(state.params))
        state, metrics = step(state, batch, jax.random.key(0))
        after = jax.tree.map(np.asarray, jax.device_get(state.params))
        accumulation[num_microbatches] = (
            jax.tree.map(lambda a, b: a - b, before, after),
            {k: float(v) for k, v in metrics.items()},
        )
    (full_grads, full_metrics), (micro_grads, micro_metrics) = accumulation[1], accumulation[4]
    report["accumulation"] = {
        "max_grad_diff": max(
            jax.tree.leaves(
                jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), full_grads, micro_grads)
            )
        ),
        "max_grad": max(
            jax.tree.leaves(jax.tree.map(lambda a: float(np.abs(a).max()), full_grads))
        ),
        "full_metrics": full_metrics,
        "micro_metrics": micro_metrics,
    }

    # A batch the data axis does not divide must fail with a message saying what to change.
    _, shardings = train_state_shardings(sgd_model, sgd, mesh)
    state = jax.device_put(sgd_initial_state, shardings)
    errors = {}
    for name, batch_size, num_microbatches in [("batch10", 10, 1), ("micro", 16, 8)]:
        step = make_train_step(
            sgd_model,
            sgd,
            Seq2SeqObjective(z_loss=0.0),
            mesh,
            num_microbatches,
            state_shardings=shardings,
        )
        try:
            step(state, synthetic_batch(0, batch_size=batch_size), jax.random.key(0))
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    report["errors"] = errors
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    return eight_devices.run_worker(__file__, "train_steps")


@pytest.mark.parametrize("mesh_name", ["x".join(map(str, m)) for m in MESHES] + ["2x2x2+dropout"])
def test_sharded_train_step_matches_single_device(report, mesh_name):
    result = report["meshes"][mesh_name]
    assert result["step"] == NUM_STEPS
    for got, want in zip(result["losses"], result["reference_losses"], strict=True):
        for key in ("loss", "cross_entropy", "z_loss", "weight_sum", "grad_norm", "learning_rate"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
    # Float32 reductions in a different order: differences at the level of rounding.
    assert result["max_param_diff"] <= 1e-5 * max(1.0, result["max_param"]), result


def test_loss_changes_over_steps(report):
    losses = [step["loss"] for step in report["meshes"]["8x1x1"]["reference_losses"]]
    assert len(set(losses)) == NUM_STEPS and all(np.isfinite(losses))


def test_gradient_accumulation_equals_full_batch(report):
    accumulation = report["accumulation"]
    assert accumulation["max_grad"] > 0
    assert accumulation["max_grad_diff"] <= 1e-5 * accumulation["max_grad"], accumulation
    full, micro = accumulation["full_metrics"], accumulation["micro_metrics"]
    for key in ("loss", "z_loss", "weight_sum", "grad_norm"):
        np.testing.assert_allclose(micro[key], full[key], rtol=1e-5, err_msg=key)


def test_indivisible_batch_fails_with_what_to_change(report):
    errors = report["errors"]
    assert errors["batch10"] is not None and "not divisible by 4" in errors["batch10"]
    assert "Change the batch size" in errors["batch10"]
    assert errors["micro"] is not None and "num_microbatches 8" in errors["micro"]


def test_activation_constraints_with_mesh_in_context():
    import jax

    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import optimizers, partitioning
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    model = T5(tiny_config())
    optimizer = optimizers.make_optimizer("adamw_rms_scaled", 1e-3)
    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = make_train_step(
        model,
        optimizer,
        Seq2SeqObjective(z_loss=0.0),
        mesh,
        state_shardings=shardings,
        activation_constraints=True,
    )
    step(state, synthetic_batch(0), jax.random.key(0))


if __name__ == "__main__":
    workers = {"train_steps": _worker_train_steps}
    print(json.dumps(workers[sys.argv[1]]()))
