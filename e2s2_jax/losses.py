"""Pure loss functions: token cross-entropy with z-loss and label smoothing (uniform, or
rectified towards the model's own detached prediction), the label-smoothed NLL of
log-probability scores used as is (SurfaceFusion), masked means, and E2S2's contrastive NT-Xent.

Shapes: `logits` is `[..., vocab]` (float32 is expected), `targets` and `weights` are `[...]`.
Losses are returned as sums with the matching weight sum, so that callers (gradient
accumulation, multi-host reductions) can add sums first and normalise once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def label_smoothing_constants(
    vocab_size: int, label_smoothing: float
) -> tuple[float, float, float]:
    """`(confidence, low_confidence, normalizing_constant)` of t5x's label smoothing.

    The target distribution puts `confidence = 1 - label_smoothing` on the target token and
    `low_confidence` on every other token; `normalizing_constant` is that distribution's entropy,
    subtracted from the cross-entropy so that predicting it exactly costs 0.
    """
    confidence = 1.0 - label_smoothing
    low_confidence = (1.0 - confidence) / (vocab_size - 1)
    # Python floats: these are trace-time constants, also inside jit.
    normalizing_constant = -(
        confidence * math.log(confidence)
        + (vocab_size - 1) * low_confidence * math.log(low_confidence + 1e-20)
    )
    return confidence, low_confidence, normalizing_constant


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_cross_entropy(
    logits: Array, targets: Array, soft_target_values: Array, z_loss: float
) -> tuple[Array, Array]:
    """Per-token `(cross_entropy + z_loss_term, z_loss_term)`, both `[...]` float32.

    `soft_target_values` is `[2]`: (on value, off value) of the smoothed one-hot targets. The
    custom gradient avoids materialising the one-hot target tensor's backward pass.
    """
    loss, z_term, _ = _token_cross_entropy_fwd_impl(logits, targets, soft_target_values, z_loss)
    return loss, z_term


def _token_cross_entropy_fwd_impl(logits, targets, soft_target_values, z_loss):
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    log_softmax = logits - log_z
    on_value, off_value = soft_target_values[0], soft_target_values[1]
    target_log_prob = jnp.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]
    # sum_v soft_target[v] * log_softmax[v], without building the one-hot tensor.
    expected_log_prob = (on_value - off_value) * target_log_prob + off_value * jnp.sum(
        log_softmax, axis=-1
    )
    log_z = log_z[..., 0]
    z_term = z_loss * jnp.square(log_z)
    return -expected_log_prob + z_term, z_term, (log_softmax, log_z)


def _token_cross_entropy_fwd(logits, targets, soft_target_values, z_loss):
    loss, z_term, (log_softmax, log_z) = _token_cross_entropy_fwd_impl(
        logits, targets, soft_target_values, z_loss
    )
    return (loss, z_term), (log_softmax, log_z, targets, soft_target_values)


def _token_cross_entropy_bwd(z_loss, residuals, cotangents):
    log_softmax, log_z, targets, soft_target_values = residuals
    loss_cotangent, z_cotangent = cotangents
    softmax = jnp.exp(log_softmax)
    on_value, off_value = soft_target_values[0], soft_target_values[1]
    vocab_size = log_softmax.shape[-1]
    # d(loss)/d(logits) = softmax * sum(soft_targets) - soft_targets + 2 z log_z softmax;
    # sum(soft_targets) = on + (V - 1) off (1 for label smoothing as configured).
    target_mass = on_value + (vocab_size - 1) * off_value
    one_hot = jax.nn.one_hot(targets, vocab_size, dtype=softmax.dtype)
    soft_targets = off_value + (on_value - off_value) * one_hot
    z_grad = 2.0 * z_loss * log_z[..., None] * softmax
    grad = loss_cotangent[..., None] * (softmax * target_mass - soft_targets + z_grad)
    grad = grad + z_cotangent[..., None] * z_grad
    return grad, None, None


_token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)


def cross_entropy_with_logits(
    logits: Array,
    targets: Array,
    weights: Array | None,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Weighted token cross-entropy with t5x's semantics.

    Args:
      logits: `[..., vocab]` unnormalised scores.
      targets: `[...]` int target ids.
      weights: `[...]` loss weights (0 at padding), or None for all ones.
      z_loss: coefficient of the auxiliary `z_loss * log(Z)**2` term (Z the softmax normaliser),
        which keeps logits from drifting; t5x uses 1e-4.
      label_smoothing: mass spread uniformly over the non-target tokens.

    Returns:
      `(loss_sum, z_loss_sum, weight_sum)`, float32 scalars. As in t5x, `loss_sum` includes the
      z-loss term (`z_loss_sum` is reported separately for logging) and has the entropy of the
      smoothed targets subtracted, so a perfect prediction of them scores 0.
    """
    vocab_size = logits.shape[-1]
    confidence, low_confidence, normalizing_constant = label_smoothing_constants(
        vocab_size, label_smoothing
    )
    soft_target_values = jnp.asarray([confidence, low_confidence], jnp.float32)
    token_loss, token_z_loss = _token_cross_entropy(
        # The float32 cast sits outside the custom gradient so autodiff casts the cotangent back.
        logits.astype(jnp.float32),
        targets.astype(jnp.int32),
        soft_target_values,
        float(z_loss),
    )
    token_loss = token_loss - normalizing_constant
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    return (
        jnp.sum(token_loss * weights),
        jnp.sum(token_z_loss * weights),
        jnp.sum(weights),
    )


def rectified_cross_entropy_with_logits(
    logits: Array,
    targets: Array,
    weights: Array | None,
    *,
    rectified_label_smoothing: float,
    reference_logits: Array,
    z_loss: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Weighted token cross-entropy against rectified smooth labels (self-evolution learning's
    token-specific label smoothing, Zhong et al. 2023, and the Vega v2 report): per token, with
    `a = rectified_label_smoothing`, `y` the one-hot target and `q = stop_gradient(softmax(
    reference_logits))`, the target distribution is `t = (1 - a) * y + a * q` and the token
    loss is `-sum_v t[v] * log_softmax(logits)[v] - H(t) + z_loss * log(Z)**2`, i.e.
    `KL(t || p)` plus the z-loss: as t5x's smoothing, a prediction equal to the target costs 0
    (the authors' criterion leaves out `- H(t)`, a constant: same gradient).

    `reference_logits` is the model's prediction from another pass: in the authors' code
    (and `objectives.reference_logits`) the same model without dropout on the uncorrupted
    input. Gradient wrt the logits: `softmax - (1 - a) * y - a * q` (+ the z-loss's). Were `q`
    taken from `logits` themselves, the gradient would collapse to `(1 - a) * (softmax - y)`,
    the hard-label gradient scaled down: hence the separate pass.

    Returns `(loss_sum, z_loss_sum, weight_sum)` as `cross_entropy_with_logits`.
    """
    logits = logits.astype(jnp.float32)
    reference_probs = jax.lax.stop_gradient(
        jax.nn.softmax(reference_logits.astype(jnp.float32), axis=-1)
    )
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_softmax = logits - log_z[..., None]
    one_hot = jax.nn.one_hot(targets.astype(jnp.int32), logits.shape[-1], dtype=jnp.float32)
    soft_targets = (1.0 - rectified_label_smoothing) * one_hot + (
        rectified_label_smoothing * reference_probs
    )
    target_entropy = -jnp.sum(jax.scipy.special.xlogy(soft_targets, soft_targets), axis=-1)
    z_term = z_loss * jnp.square(log_z)
    token_loss = -jnp.sum(soft_targets * log_softmax, axis=-1) - target_entropy + z_term
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(token_loss * weights), jnp.sum(z_term * weights), jnp.sum(weights)


def label_smoothed_nll(
    scores: Array,
    targets: Array,
    weights: Array | None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Weighted token NLL of log-probability scores used as is, never renormalised: fairseq's
    `label_smoothed_nll_loss` (v0.9.0, the version the SurfaceFusion reference runs on).

    Per token, with `eps = label_smoothing` and `V` the vocabulary size:
    `(1 - eps) * -scores[target] + eps / V * -sum_v scores[v]`. Unlike
    `cross_entropy_with_logits` there is no `logsumexp` (SurfaceFusion's "hard"/"gate" scores,
    `models/fusion.py`, are not a softmax's logits: their `exp` sums to at most 1), so no
    z-loss, and no entropy of the smoothed targets is subtracted (fairseq's value; t5x's
    smoothing puts `eps / (V - 1)` on each non-target token instead of `eps / V` on every one).

    Args:
      scores: `[..., vocab]` log-probability scores (cast to float32).
      targets: `[...]` int target ids.
      weights: `[...]` loss weights (0 at padding), or None for all ones.
      label_smoothing: fairseq's epsilon.

    Returns:
      `(loss_sum, z_loss_sum, weight_sum)` as `cross_entropy_with_logits`, float32 scalars;
      `z_loss_sum` is always 0.
    """
    scores = scores.astype(jnp.float32)
    vocab_size = scores.shape[-1]
    target_scores = jnp.take_along_axis(scores, targets.astype(jnp.int32)[..., None], -1)[..., 0]
    token_loss = -(1.0 - label_smoothing) * target_scores
    if label_smoothing:
        token_loss = token_loss - label_smoothing / vocab_size * jnp.sum(scores, axis=-1)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(token_loss * weights), jnp.zeros((), jnp.float32), jnp.sum(weights)


def masked_mean(values: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of `values` over the positions where `mask` is nonzero (mask broadcasts to values).

    Returns float32 with `axis` reduced (a scalar for `axis=None`); 0 where the mask is empty.
    """
    mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
    total = jnp.sum(values.astype(jnp.float32) * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1e-20), 0.0)


# A large negative similarity for excluded candidates: finite, so an anchor with no valid
# candidate gives a finite (masked-out) loss and no NaN gradient.
_EXCLUDED_LOGIT = -1e9


def nt_xent(
    view_a: Array,
    view_b: Array,
    valid: Array | None = None,
    *,
    temperature: float = 1.0,
    num_groups: int = 1,
) -> tuple[Array, Array, Array]:
    """Symmetric NT-Xent (SimCLR's normalised-temperature cross-entropy) between two views.

    Every valid example of both views is an anchor: the positive of `view_a[i]` is `view_b[i]`
    (and vice versa); its negatives are every other valid example of both views (2N - 2 for N
    valid examples). Similarity is cosine similarity divided by `temperature`.

    Args:
      view_a, view_b: `[examples, embed]` embeddings (normalised here).
      valid: `[examples]` bool, false for slots that are not examples (padding rows, empty
        packed-segment slots): they are neither anchors, positives nor negatives.
      temperature: divides the cosine similarities.
      num_groups: contrast within `num_groups` contiguous, equal blocks of examples only
        (per-device negatives when the examples are laid out contiguously per device).

    Returns:
      `(loss_sum, correct_sum, anchor_count)`, float32 scalars: the summed loss over anchors,
      the number of anchors whose positive is strictly more similar than every negative, and
      the number of anchors (2 x valid examples).
    """
    num_examples, embed = view_a.shape
    if num_examples % num_groups:
        raise ValueError(
            f"nt_xent: {num_examples} examples do not split into num_groups={num_groups} "
            "equal groups."
        )
    if valid is None:
        valid = jnp.ones((num_examples,), bool)
    group_size = num_examples // num_groups

    def normalize(x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-24))

    # [groups, 2n, embed]: view a's block of each group, then view b's.
    embeddings = jnp.concatenate(
        [
            normalize(view_a).reshape(num_groups, group_size, embed),
            normalize(view_b).reshape(num_groups, group_size, embed),
        ],
        axis=1,
    )
    group_valid = jnp.tile(valid.reshape(num_groups, group_size), (1, 2))
    logits = jnp.einsum("gie,gje->gij", embeddings, embeddings) / temperature
    index = jnp.arange(2 * group_size)
    positive_index = (index + group_size) % (2 * group_size)
    is_self = index[:, None] == index[None, :]
    candidate = group_valid[:, None, :] & ~is_self[None]
    logits = jnp.where(candidate, logits, _EXCLUDED_LOGIT)
    positive_logit = jnp.take_along_axis(
        logits, jnp.broadcast_to(positive_index[None, :, None], (num_groups, 2 * group_size, 1)), 2
    )[..., 0]
    anchor_loss = jax.nn.logsumexp(logits, axis=-1) - positive_logit
    is_positive = index[None, :] == positive_index[:, None]
    best_negative = jnp.max(jnp.where(is_positive[None], _EXCLUDED_LOGIT, logits), axis=-1)
    anchor_weights = group_valid.astype(jnp.float32)
    return (
        jnp.sum(jnp.where(group_valid, anchor_loss, 0.0)),
        jnp.sum(anchor_weights * (positive_logit > best_negative)),
        jnp.sum(anchor_weights),
    )


def classification_accuracy_sum(logits: Array, targets: Array, weights: Array) -> Array:
    """Weighted count of positions whose argmax over `logits` `[..., classes]` equals the
    int `targets` `[...]`: float32 scalar (divide by the weight sum for the accuracy)."""
    correct = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(correct.astype(jnp.float32) * weights.astype(jnp.float32))
