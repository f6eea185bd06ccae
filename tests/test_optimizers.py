"""Schedules and optimizers against closed forms and NumPy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from e2s2_jax.training import optimizers
from e2s2_jax.training.optimizers import make_optimizer, rsqrt_schedule


def test_rsqrt_schedule_closed_form():
    schedule = rsqrt_schedule(base_learning_rate=1.0, warmup_steps=100)
    for step in [0, 1, 50, 100, 101, 400, 10_000]:
        expected = 1.0 / np.sqrt(max(step, 100))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(rsqrt_schedule(2.0, 10_000)(0)), 0.02, rtol=1e-6)
    with pytest.raises(ValueError):
        rsqrt_schedule(1.0, 0)


def _random_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "big": rng.normal(size=(6, 5)).astype(np.float32) * 0.5,
        "tiny": rng.normal(size=(4,)).astype(np.float32) * 1e-5,  # RMS below the 1e-3 floor.
    }


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adamw_rms_scaled_one_step_matches_numpy(weight_decay):
    params = _random_params(0)
    grads = jax.tree.map(lambda p: np.random.default_rng(1).normal(size=p.shape), params)
    lr, b1, b2, eps = 0.02, 0.9, 0.999, 1e-8
    optimizer = make_optimizer(
        "adamw_rms_scaled", lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
    )
    state = optimizer.init(jax.tree.map(jnp.asarray, params))
    updates, _ = optimizer.update(
        jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads),
        state,
        jax.tree.map(jnp.asarray, params),
    )
    for name, param in params.items():
        g = grads[name].astype(np.float64)
        p = param.astype(np.float64)
        m_hat = ((1 - b1) * g) / (1 - b1)
        v_hat = ((1 - b2) * g**2) / (1 - b2)
        direction = m_hat / (np.sqrt(v_hat) + eps)
        scale = max(1e-3, np.sqrt(np.mean(p**2)))
        expected = -lr * (direction * scale + weight_decay * p)
        np.testing.assert_allclose(np.asarray(updates[name]), expected, rtol=1e-5, atol=1e-9)


def test_adafactor_t5x_defaults_factor_and_clip():
    params = {"matrix": jnp.ones((256, 128)), "vector": jnp.ones((128,))}
    optimizer = make_optimizer("adafactor", rsqrt_schedule(1.0, 10_000))
    state = optimizer.init(params)
    factored = [s for s in jax.tree.leaves(state) if getattr(s, "shape", None) in ((256,), (128,))]
    assert factored, "the 256x128 matrix's second moment should be factored into row/col stats"
    grads = {"matrix": jnp.full((256, 128), 5.0), "vector": jnp.full((128,), 5.0)}
    updates, _ = optimizer.update(grads, state, params)
    # Update clipping at RMS 1, times parameter scale 1, times lr 0.01 during warm-up.
    for update in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(update))), 0.01, rtol=1e-4)


def test_gradient_clipping_rescales_to_the_global_norm():
    params = {"a": jnp.ones((3,)), "b": jnp.full((2,), 2.0)}
    grads = {"a": jnp.asarray([3.0, 0.0, 0.0]), "b": jnp.asarray([0.0, 4.0])}  # norm 5
    # A large eps makes Adam's step depend on the gradient's scale, so clipping shows.
    clipped_optimizer = make_optimizer("adamw_rms_scaled", 0.1, gradient_clip_norm=1.0, eps=1.0)
    plain_optimizer = make_optimizer("adamw_rms_scaled", 0.1, eps=1.0)
    got, _ = clipped_optimizer.update(grads, clipped_optimizer.init(params), params)
    scaled_grads = jax.tree.map(lambda g: g / 5.0, grads)
    want, _ = plain_optimizer.update(scaled_grads, plain_optimizer.init(params), params)
    unclipped, _ = plain_optimizer.update(grads, plain_optimizer.init(params), params)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
    assert not np.allclose(got["b"], unclipped["b"])
    with pytest.raises(ValueError, match="Unknown optimizer"):
        make_optimizer("sgd", 1.0)


def test_warmup_linear_decay_against_closed_form():
    from e2s2_jax.training.optimizers import warmup_linear_decay

    schedule = warmup_linear_decay(0.01, warmup_steps=6, decay_steps=16)
    for step in range(0, 20):
        expected = 0.01 * step / 6 if step < 6 else 0.01 * max(0.0, (16 - step) / 10)
        assert abs(float(schedule(step)) - expected) < 1e-9, step
    with pytest.raises(ValueError, match="below decay_steps"):
        warmup_linear_decay(0.01, warmup_steps=10, decay_steps=10)


def test_warmup_cosine_schedule_is_optaxs_and_refuses_a_run_shorter_than_its_warmup():
    from e2s2_jax.errors import ConfigError

    ours = optimizers.warmup_cosine_decay_schedule(0.0, 0.02, 10, 100, 1e-5)
    reference = optax.warmup_cosine_decay_schedule(0.0, 0.02, 10, 100, 1e-5)
    for step in (0, 5, 10, 50, 99, 100, 150):
        assert float(ours(step)) == float(reference(step))
    for warmup, total in ((50, 10), (10, 10), (-1, 10)):
        with pytest.raises(ConfigError, match=r"TRAIN_STEPS.*warmup_cosine_decay_schedule"):
            optimizers.warmup_cosine_decay_schedule(0.0, 0.02, warmup, total)


def _np_adafactor_step(param, grad, lr):
    """One first-step Adafactor update of a matrix in float64 NumPy (Shazeer & Stern 2018,
    t5x's T5 1.1 settings): at step 1 the decay `1 - 1**-0.8` is 0, so the row and column
    statistics are the means of `grad**2 + 1e-30`; then update clipping at RMS 1 and the
    parameter-scale step `max(1e-3, RMS(param))`."""
    squared = grad**2 + 1e-30
    row, col = squared.mean(axis=1), squared.mean(axis=0)
    update = grad / np.sqrt(np.outer(row / row.mean(), col))
    update /= max(1.0, np.sqrt(np.mean(update**2)))
    return -lr * max(1e-3, np.sqrt(np.mean(param**2))) * update


def test_adafactor_factors_t5_attention_kernels_and_matches_numpy():
    from e2s2_jax.models.config import T5Config
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.training.train_state import abstract_boxed_params

    # heads x kv = 2 x 64: the joined dimension reaches the 128 needed to factor.
    config = T5Config(
        vocab_size=256, d_model=128, num_heads=2, d_kv=64, d_ff=256,
        num_encoder_layers=1, num_decoder_layers=1,
    )  # fmt: skip
    params = jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype), nn.unbox(abstract_boxed_params(T5(config)))
    )
    optimizer = make_optimizer("adafactor", 0.01)
    state = optimizer.init(params)[0]  # optax's FactoredState
    attention = {"query", "key", "value", "out"}
    checked = 0
    for (path, param), v_row, v_col, v in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(state.v_row),
        jax.tree.leaves(state.v_col),
        jax.tree.leaves(state.v),
        strict=True,
    ):
        if {getattr(entry, "key", None) for entry in path} & attention:
            assert param.shape == (128, 128), (path, param.shape)
            assert v_row.shape == v_col.shape == (128,) and v.shape == (1,), path
            checked += 1
    assert checked == 4 * 3  # encoder self, decoder self and cross attention

    rng = np.random.default_rng(0)
    param = rng.normal(size=(128, 256)) * 0.05
    grad = rng.normal(size=(128, 256)) * np.linspace(0.1, 3.0, 256)  # column scales differ
    update, _ = optimizer.update(
        {"w": jnp.asarray(grad, jnp.float32)},
        optimizer.init({"w": jnp.asarray(param, jnp.float32)}),
        {"w": jnp.asarray(param, jnp.float32)},
    )
    np.testing.assert_allclose(
        np.asarray(update["w"]), _np_adafactor_step(param, grad, 0.01), rtol=2e-4, atol=1e-9
    )
