"""sigmaReparam: the power iteration against numpy.linalg.svd, the reparametrised model equal to
the plain one at step 0 (fresh and loaded weights, an HF import among them), the param tree
unchanged when off, the power-iteration vectors sharded like their kernels, 8 simulated devices
equal to one, gradient accumulation advancing them once per step, and HF export of W_hat.

The 8-device part runs in a subprocess (this file as a script), as `test_train_step.py` does.
"""

from __future__ import annotations

import sys

import eight_devices
import numpy as np
import pytest
from numerics import FLOAT32_EPS, assert_close_to_scale
from test_train_step import synthetic_batch, tiny_config

MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8)]
STEPS = 300  # power-iteration steps of the convergence test
NUM_STEPS = 3


def _numpy_power_step(kernel, u):
    """The reference's step (apple/ml-sigma-reparam `SpectralNormedWeight.get_sigma`) for our
    `[in, out]` kernel, in float64: `(u', v, sigma)`."""
    kernel = kernel.astype(np.float64)
    v = u @ kernel
    v /= np.linalg.norm(v)
    u_new = kernel @ v
    u_new /= np.linalg.norm(u_new)
    return u_new, v, u_new @ kernel @ v


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96), (512, 1024)])
def test_power_iteration_converges_to_the_top_singular_value(shape):
    import jax
    import jax.numpy as jnp

    from e2s2_jax.models import sigma_reparam

    rng = np.random.default_rng(shape[0] + shape[1])
    kernel = rng.normal(0.0, 1.0, shape).astype(np.float32)
    singular_values = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
    top, ratio = singular_values[0], singular_values[1] / singular_values[0]
    u = rng.normal(size=shape[0]).astype(np.float32)
    u /= np.linalg.norm(u)

    step = jax.jit(lambda k, u: sigma_reparam.power_step(k, u))
    estimates = []
    u_jax = jnp.asarray(u)
    for _ in range(STEPS):
        u_next, v = step(kernel, u_jax)
        estimates.append(float(sigma_reparam.spectral_norm_estimate(kernel, u_next, v)))
        u_jax = u_next
    # One step is the reference's arithmetic, here in float32 against float64 (same start): the
    # estimate sums ~in + out rounded products, a random walk of about sqrt(in) roundings.
    _, _, sigma1 = _numpy_power_step(kernel, u)
    float32_ulps = 8 * shape[0] ** 0.5
    assert_close_to_scale(estimates[0], sigma1, float32_ulps)
    # u^T W v of unit vectors never exceeds sigma_1, and from a random start the first step is
    # measurably below it (the test sees the iteration do the work).
    assert max(estimates) <= top * (1 + float32_ulps * FLOAT32_EPS)
    assert estimates[0] < top * (1 - 1e-3)
    # Convergence at the power method's rate: after k steps (each multiplies u by W W^T) the
    # angle to the top singular vector shrinks by (s2/s1)^(2k) from a random start's
    # tan(angle) ~ sqrt(in), and the estimate's relative error is about the angle squared:
    # in * (s2/s1)^(4k), down to float32 rounding. Random Gaussian matrices have a small gap
    # (s2/s1 up to ~0.99 at 512 x 1024, T5-small's feed-forward shape), the slowest case.
    predicted = shape[0] * ratio ** (4 * STEPS) + float32_ulps * FLOAT32_EPS
    error = abs(estimates[-1] - top) / top
    assert error <= predicted, (error, predicted, ratio)
    if ratio ** (4 * STEPS) * shape[0] < FLOAT32_EPS:  # the rate says: converged by now
        assert error <= float32_ulps * FLOAT32_EPS, (error, ratio)


def _init(config, seed=0):
    import flax.linen as nn
    import jax

    from e2s2_jax.models.t5 import T5

    batch = synthetic_batch(seed, batch_size=4)
    model = T5(config)
    params = nn.unbox(
        model.init(
            jax.random.key(seed), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
        )
    )["params"]
    return model, params, batch


def _logits(model, params, batch):
    return np.asarray(
        model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
        )
    )


# W_hat = (gamma / sigma) * W with gamma the same estimate as sigma: W times 1 up to a rounding
# or two of the ratio, so each kernel within a few ulps of itself, and the logits (through 2+2
# layers of sums of O(10) terms) within a few dozen roundings of their scale.
LOGIT_ULPS = 64


@pytest.mark.parametrize("scan", [False, True])
def test_reparametrised_weights_give_the_plain_models_function(scan):
    from e2s2_jax.models import sigma_reparam

    model, params, batch = _init(tiny_config(scan_layers=scan), seed=3)
    reparam_params, model_state = sigma_reparam.reparametrise(params)
    paths = sigma_reparam.kernel_paths(params)
    # Every attention and feed-forward kernel of both stacks, nothing else.
    # Encoder layers: 4 attention + 3 feed-forward kernels; decoder layers 8 + 3; two of each.
    assert len(paths) == (7 + 11 if scan else 2 * 7 + 2 * 11)
    assert all(p[0] in ("encoder", "decoder") for p in paths)
    folded = sigma_reparam.fold(reparam_params, model_state)
    for path in paths:
        kernel = params
        effective = folded
        for key in path:
            kernel, effective = kernel[key], effective[key]
        assert set(effective) == {"kernel"}  # gamma dropped from the plain tree
        assert_close_to_scale(effective["kernel"], kernel["kernel"], 4, err_msg=str(path))
    assert_close_to_scale(_logits(model, folded, batch), _logits(model, params, batch), LOGIT_ULPS)


def test_an_hf_import_reparametrised_keeps_its_logits(tmp_path):
    """Import a tiny random HF T5 1.1, reparametrise it (what `train.initial_checkpoint` does with
    `T5Config.sigma_reparam`): W_hat equals the imported kernels and the logits are HF's."""
    import dataclasses

    import hf_fixtures

    from e2s2_jax.interop.hf import import_hf
    from e2s2_jax.models import sigma_reparam
    from e2s2_jax.models.t5 import T5

    hf_fixtures.make_hf_t5(str(tmp_path / "hf"), "1.1", seed=2)
    config, params = import_hf(str(tmp_path / "hf"))
    reparam_params, model_state = sigma_reparam.reparametrise(params)
    folded = sigma_reparam.fold(reparam_params, model_state)
    encoder_tokens, decoder_tokens = hf_fixtures.random_batch(4)

    def logits(config, params):
        return np.asarray(T5(config).apply({"params": params}, encoder_tokens, decoder_tokens))

    reparam_config = dataclasses.replace(config, sigma_reparam=True)
    assert_close_to_scale(logits(reparam_config, folded), logits(config, params), LOGIT_ULPS)


def test_param_tree_is_unchanged_when_off_and_vectors_follow_their_kernels():
    import flax.linen as nn
    import jax
    import optax

    from e2s2_jax.models.t5 import T5
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import abstract_boxed_params, train_state_shardings

    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    plain, _ = train_state_shardings(T5(tiny_config()), optax.adamw(1e-3), mesh)
    assert plain.model_state == {}
    plain_tree = jax.tree.structure(nn.unbox(abstract_boxed_params(T5(tiny_config()))))
    assert jax.tree.structure(plain.params) == plain_tree

    model = T5(tiny_config(sigma_reparam=True))
    abstract, shardings = train_state_shardings(model, optax.adamw(1e-3), mesh)
    query = abstract.params["encoder"]["layers_0"]["attention"]["query"]
    assert query["gamma"].shape == () and query["kernel"].shape == (16, 16)
    vectors = abstract.model_state["sigma_reparam"]["decoder"]["layers_1"]
    assert vectors["mlp"]["wo"]["u"].shape == (32,)  # wo is [mlp, embed]: u over mlp
    # Sharded like the kernel's rows: the mesh axis of the kernel's first logical axis.
    kernel_spec = shardings.params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"].spec
    u_spec = shardings.model_state["sigma_reparam"]["decoder"]["layers_1"]["mlp"]["wo"]["u"].spec
    assert tuple(u_spec) == tuple(kernel_spec)[:1]


def _worker_sharded() -> dict:
    """Runs in the 8-device subprocess: sigmaReparam train steps on 1 and 8 devices, and
    gradient accumulation against the full batch."""
    import jax
    import optax

    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state, train_state_shardings
    from e2s2_jax.training.train_step import make_train_step

    assert jax.device_count() == 8, jax.devices()
    optimizer = optax.adamw(3e-3)
    model = T5(tiny_config(sigma_reparam=True))
    batches = [synthetic_batch(seed) for seed in range(NUM_STEPS)]
    single = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, _ = init_train_state(model, optimizer, single, jax.random.key(0))
    initial = jax.device_get(state)

    def run(mesh, num_microbatches=1):
        _, shardings = train_state_shardings(model, optimizer, mesh)
        state = jax.device_put(initial, shardings)
        step = make_train_step(
            model, optimizer, Seq2SeqObjective(), mesh, num_microbatches, state_shardings=shardings
        )
        losses = []
        for batch in batches:
            state, metrics = step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        host = jax.device_get(state)
        leaves = [np.asarray(x) for x in jax.tree.leaves((host.params, host.model_state))]
        return losses, leaves

    reference_losses, reference = run(single)
    report = {"reference_losses": reference_losses, "meshes": {}}
    scale = max(float(np.abs(x).max()) for x in reference)
    for mesh_shape in MESHES:
        losses, leaves = run(partitioning.create_mesh(*mesh_shape))
        report["meshes"]["x".join(map(str, mesh_shape))] = {
            "losses": losses,
            "max_diff": max(
                float(np.abs(a - b).max()) for a, b in zip(leaves, reference, strict=True)
            ),
            "scale": scale,
        }
    losses, leaves = run(single, num_microbatches=4)
    report["accumulated"] = {
        "losses": losses,
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(leaves, reference, strict=True)),
        "scale": scale,
    }
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    return eight_devices.run_worker(__file__, "sharded")


@pytest.mark.parametrize("mesh_name", ["x".join(map(str, m)) for m in MESHES] + ["accumulated"])
def test_sharded_and_accumulated_steps_match_one_device(report, mesh_name):
    result = report["accumulated"] if mesh_name == "accumulated" else report["meshes"][mesh_name]
    # The same tolerances as the plain model's sharding test (test_train_step.py): float32
    # reductions in another order, over 3 steps.
    np.testing.assert_allclose(result["losses"], report["reference_losses"], rtol=2e-5)
    assert result["max_diff"] <= 1e-5 * max(1.0, result["scale"]), result
    assert len(set(report["reference_losses"])) == NUM_STEPS


if __name__ == "__main__":
    import json

    print(json.dumps({"sharded": _worker_sharded}[sys.argv[1]]()))
