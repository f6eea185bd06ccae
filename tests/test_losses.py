"""Cross-entropy (z-loss, label smoothing), the label-smoothed NLL of scores used as is, and
masked means against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale

from e2s2_jax.losses import (
    cross_entropy_with_logits,
    label_smoothed_nll,
    masked_mean,
    rectified_cross_entropy_with_logits,
)


def reference_cross_entropy(logits, targets, weights, z_loss, label_smoothing):
    """t5x's compute_weighted_cross_entropy written out in float64 NumPy."""
    logits = logits.astype(np.float64)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (vocab - 1)
    normalizing = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top
    log_softmax = logits - log_z
    z_term = z_loss * log_z[..., 0] ** 2
    token_loss = -(soft * log_softmax).sum(-1) + z_term - normalizing
    return (token_loss * weights).sum(), (z_term * weights).sum(), weights.sum()


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-4, 0.0), (0.1, 0.1)])
def test_cross_entropy_matches_numpy_reference(z_loss, label_smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    got = cross_entropy_with_logits(
        jnp.asarray(logits),
        jnp.asarray(targets),
        jnp.asarray(weights),
        z_loss=z_loss,
        label_smoothing=label_smoothing,
    )
    want = reference_cross_entropy(logits, targets, weights, z_loss, label_smoothing)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_perfect_smoothed_prediction_costs_nothing():
    vocab, smoothing = 7, 0.2
    targets = np.array([[0, 3, 6]], np.int32)
    low = smoothing / (vocab - 1)
    probs = np.full((1, 3, vocab), low)
    np.put_along_axis(probs, targets[..., None], 1 - smoothing, axis=-1)
    loss_sum, _, weight_sum = cross_entropy_with_logits(
        jnp.log(jnp.asarray(probs, jnp.float32)),
        jnp.asarray(targets),
        None,
        label_smoothing=smoothing,
    )
    assert float(weight_sum) == 3.0
    assert abs(float(loss_sum)) < 1e-5


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (0.05, 0.1)])
def test_gradient_matches_finite_differences(z_loss, label_smoothing):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5))
    targets = rng.integers(0, 5, size=(2, 3)).astype(np.int32)
    weights = rng.random((2, 3))

    def loss(flat_logits):
        loss_sum, z_sum, _ = cross_entropy_with_logits(
            flat_logits.reshape(logits.shape),
            jnp.asarray(targets),
            jnp.asarray(weights, jnp.float32),
            z_loss=z_loss,
            label_smoothing=label_smoothing,
        )
        # Both outputs carry gradients; weight them differently to check each cotangent.
        return loss_sum + 0.5 * z_sum

    x = jnp.asarray(logits.ravel(), jnp.float32)
    analytic = np.asarray(jax.grad(loss)(x), np.float64)
    step = 1e-2
    numeric = np.empty_like(analytic)
    for i in range(x.size):
        bump = np.zeros(x.size, np.float32)
        bump[i] = step
        # Central differences in float32 are accurate to ~1e-4 at this step size.
        numeric[i] = (float(loss(x + bump)) - float(loss(x - bump))) / (2 * step)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=2e-3)


def test_gradient_of_weighted_sum_matches_autodiff_reference():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, size=(4,)), jnp.int32)
    weights = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    z_loss, smoothing = 1e-2, 0.1

    def autodiff_reference(lg):
        confidence = 1 - smoothing
        low = smoothing / 8
        soft = jax.nn.one_hot(targets, 9) * (confidence - low) + low
        log_z = jax.nn.logsumexp(lg, axis=-1)
        token = -(soft * jax.nn.log_softmax(lg)).sum(-1) + z_loss * log_z**2
        return (token * weights).sum()

    ours = jax.grad(
        lambda lg: cross_entropy_with_logits(
            lg, targets, weights, z_loss=z_loss, label_smoothing=smoothing
        )[0]
    )(logits)
    # softmax - target cancels to near 0 for most entries: 16 float32 ulps of the gradient's
    # scale, not a per-element rtol (tests/numerics.py; measured 0.32).
    assert_close_to_scale(ours, jax.grad(autodiff_reference)(logits), ulps=16)


def fairseq_label_smoothed_nll(scores, targets, weights, epsilon):
    """fairseq v0.9.0's `label_smoothed_nll_loss` (the SurfaceFusion reference's fairseq) on
    `lprobs = scores` as is, weighted, in float64 NumPy, and its gradient wrt the scores."""
    scores = scores.astype(np.float64)
    vocab = scores.shape[-1]
    nll_loss = -np.take_along_axis(scores, targets[..., None], -1)[..., 0]
    smooth_loss = -scores.sum(-1)
    eps_i = epsilon / vocab
    loss = (1.0 - epsilon) * nll_loss + eps_i * smooth_loss
    one_hot = np.eye(vocab)[targets]
    grad = weights[..., None] * (-(1.0 - epsilon) * one_hot - eps_i)
    return (loss * weights).sum(), weights.sum(), grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_label_smoothed_nll_matches_fairseq_on_unnormalised_scores(label_smoothing):
    """Value and gradient against fairseq's formula, on scores whose exp sums to less than 1
    (SurfaceFusion's hard fusion of two log-softmaxes): no logsumexp, no z-loss. Tolerance: the
    scores are float32 numbers; float32 rounding of the weighted sums stays within a few ulps
    per term, so 8 ulps of the summed magnitude of the terms bound the value; the gradient is
    exact up to one rounding of `eps / V` and of each product (2 ulps of 1)."""
    rng = np.random.default_rng(3)
    vocab = 11
    z_dec, z_src = rng.normal(size=(2, 3, 5, vocab)) * 3

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    scores = (0.8 * log_softmax(z_dec) + 0.2 * log_softmax(z_src)).astype(np.float32)
    assert np.all(np.exp(scores.astype(np.float64)).sum(-1) < 1)
    targets = rng.integers(0, vocab, size=(3, 5)).astype(np.int32)
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)

    def loss(s):
        return label_smoothed_nll(
            s, jnp.asarray(targets), jnp.asarray(weights), label_smoothing=label_smoothing
        )

    loss_sum, z_sum, weight_sum = loss(jnp.asarray(scores))
    grad = jax.grad(lambda s: loss(s)[0])(jnp.asarray(scores))
    want_sum, want_weights, want_grad = fairseq_label_smoothed_nll(
        scores, targets, weights.astype(np.float64), label_smoothing
    )
    eps32 = np.finfo(np.float32).eps
    magnitude = (weights * (np.abs(scores).max(-1) * (1 + label_smoothing))).sum()
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=0, atol=8 * eps32 * magnitude)
    assert float(z_sum) == 0.0 and float(weight_sum) == want_weights
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=0, atol=2 * eps32)
    # Not the cross-entropy: that renormalises the scores (its logsumexp is < 0 here).
    ce_sum, _, _ = cross_entropy_with_logits(
        jnp.asarray(scores),
        jnp.asarray(targets),
        jnp.asarray(weights),
        label_smoothing=label_smoothing,
    )
    assert abs(float(ce_sum) - want_sum) > 1.0


def test_masked_mean():
    values = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.asarray([[1, 0, 1], [0, 0, 0]])
    assert float(masked_mean(values, mask)) == 2.0
    np.testing.assert_allclose(masked_mean(values, mask, axis=1), [2.0, 0.0])
    np.testing.assert_allclose(masked_mean(values, jnp.ones((3,)), axis=0), [2.5, 3.5, 4.5])


def reference_rectified(logits, targets, weights, smoothing, z_loss, reference_logits):
    """Rectified label smoothing in float64 NumPy: the loss `KL(t || p) + z_loss log(Z)^2` with
    `t = (1 - a) y + a q`, `q = softmax(reference_logits)` held constant, and its closed-form
    gradient wrt the logits, `weights * (p - t + 2 z_loss log(Z) p)`."""
    logits = logits.astype(np.float64)
    reference = reference_logits.astype(np.float64)

    def log_softmax(x):
        top = x.max(-1, keepdims=True)
        return x - (np.log(np.exp(x - top).sum(-1, keepdims=True)) + top)

    log_p = log_softmax(logits)
    log_z = (logits - log_p)[..., 0]
    q = np.exp(log_softmax(reference))
    soft = smoothing * q
    np.put_along_axis(
        soft,
        targets[..., None],
        np.take_along_axis(soft, targets[..., None], -1) + 1 - smoothing,
        -1,
    )
    kl = (soft * (np.log(np.where(soft > 0, soft, 1.0)) - log_p)).sum(-1)
    z_term = z_loss * log_z**2
    p = np.exp(log_p)
    grad = weights[..., None] * (p - soft + 2 * z_loss * log_z[..., None] * p)
    return ((kl + z_term) * weights).sum(), (z_term * weights).sum(), grad


@pytest.mark.parametrize(
    "smoothing,z_loss,separate_reference", [(0.1, 0.0, False), (0.3, 1e-2, False), (0.2, 0.0, True)]
)
def test_rectified_label_smoothing_value_and_gradient_match_numpy(
    smoothing, z_loss, separate_reference
):
    """Value and gradient against the NumPy reference. Tolerances: the value is a weighted sum
    of 15 tokens' sums over 11 terms of size at most max|log p| (~10): float32 rounding of the
    log-softmax and of each product and partial sum is a few eps32 of that, so 64 eps32 of the
    sum of |terms| bounds it; the gradient `p - t` is a difference of numbers <= 1 computed
    with a few roundings each (exp, the normaliser, the mixture): 8 eps32 of max|reference|."""
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(3, 5, 11)) * 3).astype(np.float32)
    reference_logits = (rng.normal(size=(3, 5, 11)) * 2).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)

    def loss(lg):
        # The reference is another pass's logits, or (the degenerate case) these very logits.
        return rectified_cross_entropy_with_logits(
            lg,
            jnp.asarray(targets),
            jnp.asarray(weights),
            rectified_label_smoothing=smoothing,
            z_loss=z_loss,
            reference_logits=jnp.asarray(reference_logits) if separate_reference else lg,
        )

    loss_sum, z_sum, weight_sum = loss(jnp.asarray(logits))
    grad = jax.grad(lambda lg: loss(lg)[0])(jnp.asarray(logits))
    want_sum, want_z, want_grad = reference_rectified(
        logits,
        targets,
        weights.astype(np.float64),
        smoothing,
        z_loss,
        reference_logits if separate_reference else logits,
    )
    eps32 = np.finfo(np.float32).eps
    magnitude = (weights * np.abs(logits).max(-1) * 2 + weights * (1 + z_loss * 100)).sum()
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=0, atol=64 * eps32 * magnitude)
    np.testing.assert_allclose(float(z_sum), want_z, rtol=0, atol=64 * eps32 * magnitude)
    assert float(weight_sum) == weights.sum()
    assert_close_to_scale(grad, want_grad, ulps=8)
    if not separate_reference and z_loss == 0:
        # The same pass's prediction: the hard-label gradient scaled by (1 - a), unlike uniform
        # smoothing; which is why the objective takes the reference from another pass.
        hard = jax.grad(
            lambda lg: cross_entropy_with_logits(lg, jnp.asarray(targets), jnp.asarray(weights))[0]
        )(jnp.asarray(logits))
        assert_close_to_scale(grad, (1 - smoothing) * np.asarray(hard, np.float64), ulps=8)
        uniform = jax.grad(
            lambda lg: cross_entropy_with_logits(
                lg, jnp.asarray(targets), jnp.asarray(weights), label_smoothing=smoothing
            )[0]
        )(jnp.asarray(logits))
        assert np.max(np.abs(np.asarray(uniform) - np.asarray(grad))) > 1e-3


def test_rectified_label_smoothing_off_is_the_plain_loss_and_bad_values_stop():
    from e2s2_jax.errors import ConfigError
    from e2s2_jax.objectives import Seq2SeqObjective

    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 4, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, size=(2, 4)), jnp.int32)
    rectified = rectified_cross_entropy_with_logits(
        logits, targets, None, rectified_label_smoothing=0.0, z_loss=1e-4, reference_logits=-logits
    )
    plain = cross_entropy_with_logits(logits, targets, None, z_loss=1e-4)
    assert_close_to_scale(np.asarray(rectified), np.asarray(plain), ulps=16)
    with pytest.raises(ConfigError, match="rectified_label_smoothing"):
        Seq2SeqObjective(rectified_label_smoothing=1.0)
    with pytest.raises(ConfigError, match="set one of them to 0"):
        Seq2SeqObjective(label_smoothing=0.1, rectified_label_smoothing=0.1)
