"""losses.nt_xent against a loop-by-loop NumPy implementation (float64): loss, gradient,
temperature, the 2N - 2 negatives, invalid slots and per-group negatives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2s2_jax import losses


def numpy_nt_xent(view_a, view_b, valid=None, temperature=1.0, num_groups=1):
    """SimCLR's NT-Xent written anchor by anchor: returns (loss_sum, correct, anchor_count)."""
    view_a = np.asarray(view_a, np.float64)
    view_b = np.asarray(view_b, np.float64)
    num_examples = len(view_a)
    valid = np.ones(num_examples, bool) if valid is None else np.asarray(valid, bool)
    # Invalid slots may hold zero vectors; they are never used.
    view_a = view_a / np.maximum(np.linalg.norm(view_a, axis=1, keepdims=True), 1e-300)
    view_b = view_b / np.maximum(np.linalg.norm(view_b, axis=1, keepdims=True), 1e-300)
    group_size = num_examples // num_groups
    loss_sum = correct = count = 0.0
    for group in range(num_groups):
        members = [i for i in range(group * group_size, (group + 1) * group_size) if valid[i]]
        examples = [("a", i, view_a[i]) for i in members] + [("b", i, view_b[i]) for i in members]
        for side, i, anchor in examples:
            positive = view_b[i] if side == "a" else view_a[i]
            positive_logit = anchor @ positive / temperature
            negative_logits = [
                anchor @ other / temperature
                for other_side, j, other in examples
                if (other_side, j) != (side, i) and j != i
            ]
            all_logits = np.array([positive_logit, *negative_logits])
            loss_sum += np.log(np.sum(np.exp(all_logits))) - positive_logit
            correct += float(all(positive_logit > n for n in negative_logits))
            count += 1
    return loss_sum, correct, count


def numerical_gradient(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_loss_and_gradient_match_numpy(temperature):
    rng = np.random.default_rng(0)
    view_a = rng.normal(size=(6, 5)).astype(np.float32)
    view_b = rng.normal(size=(6, 5)).astype(np.float32)

    def loss_sum(a, b):
        return losses.nt_xent(a, b, temperature=temperature)[0]

    loss, correct, count = losses.nt_xent(view_a, view_b, temperature=temperature)
    ref_loss, ref_correct, ref_count = numpy_nt_xent(view_a, view_b, temperature=temperature)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
    assert (float(correct), float(count)) == (ref_correct, ref_count) == (ref_correct, 12)

    grad_a, grad_b = jax.grad(loss_sum, argnums=(0, 1))(jnp.asarray(view_a), jnp.asarray(view_b))
    a64, b64 = view_a.astype(np.float64), view_b.astype(np.float64)
    ref_grad_a = numerical_gradient(
        lambda a: numpy_nt_xent(a, b64, temperature=temperature)[0], a64
    )
    ref_grad_b = numerical_gradient(
        lambda b: numpy_nt_xent(a64, b, temperature=temperature)[0], b64
    )
    np.testing.assert_allclose(np.asarray(grad_a), ref_grad_a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_b), ref_grad_b, atol=1e-5)
    assert np.abs(ref_grad_a).max() > 1e-2  # the comparison is not between zeros


def test_identical_embeddings_give_log_of_2n_minus_1():
    # All similarities equal: each anchor's softmax is uniform over 1 positive + 2N - 2
    # negatives, so the mean loss is log(2N - 1) whatever the temperature.
    embeddings = np.ones((5, 3), np.float32)
    for temperature in (1.0, 0.3):
        loss, correct, count = losses.nt_xent(embeddings, embeddings, temperature=temperature)
        np.testing.assert_allclose(float(loss) / float(count), np.log(9), rtol=1e-6)
        assert float(correct) == 0  # a tie is not a correct retrieval


def test_temperature_changes_the_loss():
    rng = np.random.default_rng(1)
    view_a, view_b = rng.normal(size=(2, 4, 8)).astype(np.float32)
    warm = float(losses.nt_xent(view_a, view_b, temperature=1.0)[0])
    cold = float(losses.nt_xent(view_a, view_b, temperature=0.05)[0])
    assert abs(warm - cold) > 0.1
    np.testing.assert_allclose(
        cold, numpy_nt_xent(view_a, view_b, temperature=0.05)[0], rtol=1e-5, atol=1e-5
    )


def test_invalid_slots_are_neither_anchors_nor_negatives():
    rng = np.random.default_rng(2)
    view_a = rng.normal(size=(7, 4)).astype(np.float32)
    view_b = rng.normal(size=(7, 4)).astype(np.float32)
    valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    loss, correct, count = losses.nt_xent(view_a, view_b, valid, temperature=0.5)
    # The same loss as the valid examples alone.
    only_valid = losses.nt_xent(view_a[valid], view_b[valid], temperature=0.5)
    np.testing.assert_allclose(float(loss), float(only_valid[0]), rtol=1e-6)
    ref = numpy_nt_xent(view_a, view_b, valid, temperature=0.5)
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5)
    assert (float(correct), float(count)) == (ref[1], ref[2]) == (ref[1], 10)
    # Invalid slots get no gradient, even when they hold garbage.
    garbage = view_a.copy()
    garbage[~valid] = 1e6
    grad = jax.grad(lambda a: losses.nt_xent(a, view_b, valid)[0])(jnp.asarray(garbage))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~valid] == 0)


def test_all_invalid_is_zero_not_nan():
    embeddings = np.ones((4, 3), np.float32)
    loss, correct, count = losses.nt_xent(embeddings, embeddings, np.zeros(4, bool))
    assert (float(loss), float(correct), float(count)) == (0.0, 0.0, 0.0)


def test_groups_contrast_within_contiguous_blocks():
    rng = np.random.default_rng(3)
    view_a = rng.normal(size=(8, 6)).astype(np.float32)
    view_b = rng.normal(size=(8, 6)).astype(np.float32)
    valid = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    grouped = losses.nt_xent(view_a, view_b, valid, temperature=0.5, num_groups=2)
    ref = numpy_nt_xent(view_a, view_b, valid, temperature=0.5, num_groups=2)
    np.testing.assert_allclose(float(grouped[0]), ref[0], rtol=1e-5)
    assert float(grouped[2]) == ref[2] == 14
    # The sum of each block's own loss, and different from global negatives.
    blocks = [
        losses.nt_xent(view_a[s], view_b[s], valid[s], temperature=0.5)[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    np.testing.assert_allclose(float(grouped[0]), float(sum(blocks)), rtol=1e-6)
    global_loss = float(losses.nt_xent(view_a, view_b, valid, temperature=0.5)[0])
    assert abs(global_loss - float(grouped[0])) > 0.1
    with pytest.raises(ValueError, match="num_groups=3"):
        losses.nt_xent(view_a, view_b, num_groups=3)


def test_classification_accuracy_sum():
    logits = np.array([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
    targets = np.array([[0, 2, 2]])
    weights = np.array([[1.0, 1.0, 0.0]])
    assert float(losses.classification_accuracy_sum(logits, targets, weights)) == 1.0
