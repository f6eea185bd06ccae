"""SurfaceFusion and the EncoderFusion baselines: formulas against NumPy, the loss on the fused
score (value and gradient) and decoding's scores, stop-gradients, the zero-init identity,
cached decoding, Gin files, and a tiny model that learns with each."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import re
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import beam_search_shared_and_repeated, cached_decoder_steps, uncached_greedy
from flax import linen as nn
from flax import traverse_util
from numerics import FLOAT32_EPS, assert_close_to_scale
from test_losses import reference_cross_entropy

from e2s2_jax.decoding import DecodeConfig, make_predict_fn
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.encoder_fusion import (
    FineGrainedLayerAttention,
    LayerAttention,
    LayerwiseCoordination,
    coordinated_encoder_layer,
)
from e2s2_jax.models.fusion import (
    FUSION_MODES,
    ResidualFeedForward,
    SurfaceFusion,
    fuse_log_probs,
    scores_used_as_is,
)
from e2s2_jax.models.t5 import T5
from e2s2_jax.objectives import E2S2Objective, Seq2SeqObjective

REPO = Path(__file__).resolve().parents[1]
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one float32 ulp at 1.
# The EncoderFusion baselines by the name of their Gin file (gin/models/encoder_fusion_<name>.gin).
BASELINES = {
    "layer_attention": LayerAttention,
    "fine_grained_layer_attention": FineGrainedLayerAttention,
    "layerwise_coordination": LayerwiseCoordination,
}
TINY = T5Config(
    vocab_size=50,
    d_model=32,
    num_heads=4,
    d_kv=8,
    d_ff=64,
    num_encoder_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
)


def fusion_model(config: T5Config = TINY, **fusion_kwargs) -> T5:
    return T5(config, output_layer_factory=functools.partial(SurfaceFusion, **fusion_kwargs))


def tokens(seed: int, shape=(3, 11), pad_from: int | None = 6) -> jax.Array:
    array = np.random.RandomState(seed).randint(2, 50, shape).astype(np.int32)
    if pad_from is not None:
        array[1, pad_from:] = 0
    return jnp.asarray(array)


def init_params(model: T5, encoder_tokens, decoder_tokens, seed: int = 0):
    return nn.unbox(model.init(jax.random.PRNGKey(seed), encoder_tokens, decoder_tokens)["params"])


def randomize(params, path: tuple[str, ...], seed: int, scale: float = 0.3):
    """A copy of `params` whose leaf at `path` is random (e.g. W2, which starts at zero)."""
    flat = traverse_util.flatten_dict(params)
    flat[path] = scale * jax.random.normal(jax.random.PRNGKey(seed), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- NumPy references


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_fuse(mode, z_dec, z_src, lam, tau, gate=None):
    if mode == "hard":
        return lam * np_log_softmax(z_dec) + (1 - lam) * np_log_softmax(z_src)
    if mode == "gate":
        g = gate[..., None]
        return g * np_log_softmax(z_dec) + (1 - g) * np_log_softmax(z_src)
    if mode == "soft":
        return np_log_softmax(z_dec + np_log_softmax(tau * z_src))
    return np_log_softmax(np_log_softmax(z_dec) + np_log_softmax(tau * z_src))


def np_surface_fusion(params, embedding, hidden, encoded, encoder_tokens, mode, lam, tau):
    """The whole output layer in float64 NumPy, from its parameters and inputs."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    attention, ffn = p["surface_attention"], p["residual_ffn"]
    source_embedded = np.asarray(embedding, np.float64)[np.asarray(encoder_tokens)]
    query = hidden @ attention["query"]["kernel"]
    key = encoded @ attention["key"]["kernel"]
    value = source_embedded @ attention["value"]["kernel"]
    scores = np.einsum("bqk,bsk->bqs", query, key)
    scores = np.where((np.asarray(encoder_tokens) != 0)[:, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    surface = (weights @ value) @ attention["out"]["kernel"]

    def f(z):
        return z + np.maximum(z @ ffn["wi"]["kernel"], 0) @ ffn["wo"]["kernel"]

    f_dec, f_src = f(hidden), f(surface)
    head = p["logits_dense"]["kernel"]
    gate = None
    if mode == "gate":
        w = p["gate"]
        gate = 1 / (1 + np.exp(-(f_dec @ w["decoder_weights"] + f_src @ w["source_weights"])))
    return np_fuse(mode, f_dec @ head, f_src @ head, lam, tau, gate)


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_fusion_formula_matches_numpy(mode):
    rng = np.random.RandomState(0)
    z_dec, z_src = rng.randn(2, 4, 5, 97) * 3
    gate = 1 / (1 + np.exp(-rng.randn(4, 5)))
    lam, tau = 0.7, 0.6
    fused = fuse_log_probs(
        mode,
        jnp.asarray(z_dec, jnp.float32),
        jnp.asarray(z_src, jnp.float32),
        lam=lam,
        tau=tau,
        gate=jnp.asarray(gate, jnp.float32),
    )
    expected = np_fuse(mode, z_dec, z_src, lam, tau, gate)
    # float32 log-softmaxes of inputs up to ~12 against float64: each output is off by a few
    # roundings of the log-sum-exp's magnitude (up to ~|fused|), also where it is near 0.
    assert_close_to_scale(fused, expected, ulps=16)
    if mode in ("soft", "postnorm"):  # Normalised: the cross-entropy's logsumexp is 0.
        # The reference is 0, so the scale is the scores' (whose roundings the sum carries).
        tolerance = 16 * FLOAT32_EPS * float(np.max(np.abs(expected)))
        np.testing.assert_allclose(jax.nn.logsumexp(fused, -1), 0.0, atol=tolerance)
    else:  # A geometric mixture: logsumexp <= 0, equal only where the two agree.
        assert np.all(np.asarray(jax.nn.logsumexp(fused, -1)) < 0)


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_surface_fusion_layer_matches_numpy(mode):
    """The output layer end to end (attention over padded source, f, head, fusion)."""
    model = fusion_model(mode=mode, lam=0.7, tau=0.6)
    encoder_tokens, decoder_tokens = tokens(0), tokens(1, (3, 7), pad_from=None)
    params = init_params(model, encoder_tokens, decoder_tokens)
    params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=1)
    if mode == "gate":
        params = randomize(params, ("output_layer", "gate", "decoder_weights"), seed=2)
        params = randomize(params, ("output_layer", "gate", "source_weights"), seed=3)
    fused, state = model.apply(
        {"params": params}, encoder_tokens, decoder_tokens, mutable=["intermediates"]
    )
    encoder_outputs = model.apply({"params": params}, encoder_tokens, method=T5.encode)
    hidden = model.apply(
        {"params": params},
        decoder_tokens,
        encoder_outputs.encoded,
        encoder_outputs.mask,
        method=lambda m, *a: m.decoder(*a),
    )
    expected = np_surface_fusion(
        params["output_layer"],
        params["token_embedder"]["embedding"],
        np.asarray(hidden, np.float64),
        np.asarray(encoder_outputs.encoded, np.float64),
        encoder_tokens,
        mode,
        lam=0.7,
        tau=0.6,
    )
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)
    assert "source_logits" in state["intermediates"]["output_layer"]


def test_unknown_mode_is_rejected():
    model = fusion_model(mode="mixture")
    with pytest.raises(ValueError, match="mode"):
        init_params(model, tokens(0), tokens(1, (3, 4)))


# ----------------------------------------------------------------------------- the loss


def np_fused_loss_and_grads(
    mode, z_dec, z_src, gate_logit, targets, weights, *, lam, renormalize, label_smoothing, z_loss
):
    """The objective's loss on the fused score, and its gradients wrt `z_dec`, `z_src` and (gate)
    the gate logit, in float64 NumPy. `renormalize=False` is the reference's (fairseq v0.9.0
    `label_smoothed_nll_loss` on the score as is): per token `(1 - eps) * -fused[y] + eps / V *
    -sum(fused)`; True is t5x's softmax cross-entropy of the score as logits (smoothing
    `eps / (V - 1)` on the non-targets, its entropy subtracted) plus `z_loss * logsumexp**2`.
    The loss is the weighted mean over tokens."""
    vocab = z_dec.shape[-1]
    lsm_dec, lsm_src = np_log_softmax(z_dec), np_log_softmax(z_src)
    g = np.full(z_dec.shape[:-1], lam) if mode == "hard" else 1 / (1 + np.exp(-gate_logit))
    fused = g[..., None] * lsm_dec + (1 - g[..., None]) * lsm_src
    one_hot = np.eye(vocab)[targets]
    if not renormalize:
        eps = label_smoothing
        token = -(1 - eps) * (one_hot * fused).sum(-1) - eps / vocab * fused.sum(-1)
        d_fused = -(1 - eps) * one_hot - eps / vocab  # d token / d fused
    else:
        confidence, low = 1 - label_smoothing, label_smoothing / (vocab - 1)
        soft = low + (confidence - low) * one_hot
        entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
        top = fused.max(-1, keepdims=True)
        log_z = np.log(np.exp(fused - top).sum(-1, keepdims=True)) + top
        q = np.exp(fused - log_z)
        token = -(soft * (fused - log_z)).sum(-1) + z_loss * log_z[..., 0] ** 2 - entropy
        d_fused = q * soft.sum(-1, keepdims=True) - soft + 2 * z_loss * log_z * q
    scale = weights[..., None] / weights.sum()
    d_fused = d_fused * scale
    total = d_fused.sum(-1, keepdims=True)
    # fused = g lsm(z_dec) + (1 - g) lsm(z_src): d lsm(z)_u / d z_v = delta_uv - softmax(z)_v.
    grads = {
        "z_dec": g[..., None] * (d_fused - np.exp(lsm_dec) * total),
        "z_src": (1 - g[..., None]) * (d_fused - np.exp(lsm_src) * total),
    }
    if mode == "gate":
        grads["gate_logit"] = (d_fused * (lsm_dec - lsm_src)).sum(-1) * g * (1 - g)
    return (token * weights).sum() / weights.sum(), grads


@dataclasses.dataclass(frozen=True)
class FusedScoresModel:
    """Stands in for a T5 with a SurfaceFusion output layer, for the objectives: its "params"
    are the two paths' logits `[batch, length, vocab]` (and, for "gate", the gate logit
    `[batch, length]`), and `apply` returns their fused score, so that gradients wrt them come
    through the production objective and loss."""

    mode: str
    renormalize: bool = False
    lam: float = 0.8

    config = TINY

    @property
    def output_layer_factory(self):
        return functools.partial(
            SurfaceFusion, mode=self.mode, lam=self.lam, renormalize=self.renormalize
        )

    def apply(self, variables, *args, **kwargs):
        p = variables["params"]
        gate = jax.nn.sigmoid(p["gate_logit"]) if self.mode == "gate" else None
        return fuse_log_probs(self.mode, p["z_dec"], p["z_src"], lam=self.lam, gate=gate)


def objective_loss_and_grads(model, params, targets, weights, label_smoothing, z_loss):
    objective = Seq2SeqObjective(z_loss=z_loss, label_smoothing=label_smoothing)
    batch = {
        "encoder_input_tokens": jnp.ones(targets.shape, jnp.int32),
        "decoder_input_tokens": jnp.zeros(targets.shape, jnp.int32),
        "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
        "decoder_loss_weights": jnp.asarray(weights, jnp.float32),
    }
    normalizers = objective.normalizers(batch)

    def loss(params):
        return objective(model, params, batch, normalizers, None)

    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, metrics, grads


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["hard", "gate"])
def test_fused_loss_value_and_gradient_match_numpy(mode, label_smoothing, renormalize):
    """Seq2SeqObjective on hard/gate fused scores: by default the reference's NLL of the score as
    is (no z-loss: the `z_loss` metric is 0), with `renormalize=True` the softmax cross-entropy
    of the score (with z-loss); value and gradients wrt z_dec, z_src and the gate logit against
    float64 NumPy.

    Tolerances: the inputs are float32 numbers (the reference starts from the same values), so
    only float32 rounding inside the objective differs. Every per-token term is computed from
    log-softmaxes whose entries are accurate to a few ulps of `scale = max|z| + log V` (the
    logsumexp's magnitude), and the smoothing's `eps / V * sum` over V entries stays within
    `eps * V` such ulps; the gradient entries are differences of such probabilities times <= 1.
    32 ulps of `scale` (per unit weight) bounds both with a margin of ~4x over the measured."""
    rng = np.random.RandomState(0)
    shape = (3, 5, 97)
    z_dec, z_src = (rng.randn(2, *shape) * 3).astype(np.float32)
    gate_logit = rng.randn(*shape[:2]).astype(np.float32)
    targets = rng.randint(0, shape[-1], shape[:2])
    weights = (rng.rand(*shape[:2]) > 0.3).astype(np.float32)
    z_loss, lam = 0.05, 0.7
    params = {"z_dec": jnp.asarray(z_dec), "z_src": jnp.asarray(z_src)}
    if mode == "gate":
        params["gate_logit"] = jnp.asarray(gate_logit)
    model = FusedScoresModel(mode, renormalize=renormalize, lam=lam)
    assert scores_used_as_is(model) == (not renormalize)
    value, metrics, grads = objective_loss_and_grads(
        model, params, targets, weights, label_smoothing, z_loss
    )
    f64 = functools.partial(np.asarray, dtype=np.float64)
    want, want_grads = np_fused_loss_and_grads(
        mode,
        f64(z_dec),
        f64(z_src),
        f64(gate_logit),
        targets,
        f64(weights),
        lam=lam,
        renormalize=renormalize,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    scale = max(np.abs(z_dec).max(), np.abs(z_src).max()) + np.log(shape[-1])
    tol = 32 * EPS32 * scale
    np.testing.assert_allclose(float(value), want, rtol=0, atol=tol)
    assert sorted(grads) == sorted(want_grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(
            np.asarray(grad, np.float64),
            want_grads[name],
            rtol=0,
            atol=tol / weights.sum(),
            err_msg=name,
        )
    if renormalize:
        assert float(metrics["z_loss"]) > 0
    else:
        assert float(metrics["z_loss"]) == 0.0
        np.testing.assert_allclose(float(metrics["cross_entropy"]), want, rtol=0, atol=tol)


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_loss_gradients_on_the_issue_example(renormalize):
    """p_dec(y) = 0.9 (the rest spread evenly over a vocabulary of 8192), a uniform source
    path, lam = 0.8: the reference's loss `-(0.8 log p_dec(y) + 0.2 log p_src(y))` gives
    d/dz_dec[y] = -0.8 (1 - 0.9) = -0.08 and d/dz_src[y] = -0.2 (1 - 1/V) = -0.19998; the
    renormalised cross-entropy, with q = softmax(fused), lam (q_y - 1) = -0.409 and
    (1 - lam) (q_y - 1) = -0.102. Tolerance: 32 float32 ulps of log V (the logsumexp's scale)."""
    vocab, y = 8192, 5
    z_dec = np.full((1, 1, vocab), np.log(0.1 / (vocab - 1)), np.float32)
    z_dec[..., y] = np.log(0.9)
    z_src = np.zeros((1, 1, vocab), np.float32)
    params = {"z_dec": jnp.asarray(z_dec), "z_src": jnp.asarray(z_src)}
    model = FusedScoresModel("hard", renormalize=renormalize, lam=0.8)
    targets, weights = np.full((1, 1), y), np.ones((1, 1), np.float32)
    _, _, grads = objective_loss_and_grads(model, params, targets, weights, 0.0, 0.0)
    _, want = np_fused_loss_and_grads(
        "hard",
        z_dec.astype(np.float64),
        z_src.astype(np.float64),
        None,
        targets,
        weights,
        lam=0.8,
        renormalize=renormalize,
        label_smoothing=0.0,
        z_loss=0.0,
    )
    tol = 32 * EPS32 * np.log(vocab)
    for name in ("z_dec", "z_src"):
        np.testing.assert_allclose(grads[name][0, 0], want[name][0, 0], rtol=0, atol=tol)
    got = (float(grads["z_dec"][0, 0, y]), float(grads["z_src"][0, 0, y]))
    if renormalize:
        np.testing.assert_allclose(got, (-0.409, -0.102), atol=1e-3)
    else:
        np.testing.assert_allclose(got, (-0.08, -0.2 * (1 - 1 / vocab)), rtol=0, atol=tol)


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_objectives_on_a_fusion_model_use_its_score(mode):
    """The real model: Seq2SeqObjective's loss (z-loss and smoothing on) is the NumPy reference
    on the model's own fused output (NLL of the score as is for hard/gate, the softmax
    cross-entropy for soft/postnorm and with `renormalize`), and E2S2Objective's NLL of view N
    is the same loss. Tolerance: 64 float32 ulps of the scores' scale (one model pass in
    float32, recomputed by each objective)."""
    encoder_tokens, decoder_tokens = tokens(10), tokens(11, (3, 6), pad_from=4)
    batch = {
        "encoder_input_tokens": encoder_tokens,
        "decoder_input_tokens": jnp.concatenate(
            [jnp.zeros((3, 1), jnp.int32), decoder_tokens[:, :-1]], 1
        ),
        "decoder_target_tokens": decoder_tokens,
    }
    for renormalize in (False, True):
        model = fusion_model(mode=mode, lam=0.7, renormalize=renormalize)
        params = init_params(model, encoder_tokens, decoder_tokens)
        params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=1)
        as_is = mode in ("hard", "gate") and not renormalize
        assert scores_used_as_is(model) == as_is
        fused = np.asarray(
            model.apply(
                {"params": params}, encoder_tokens, batch["decoder_input_tokens"], decoder_tokens
            ),
            np.float64,
        )
        weights = np.asarray(decoder_tokens != 0, np.float64)
        targets = np.asarray(decoder_tokens)
        vocab = fused.shape[-1]
        if as_is:
            eps = 0.1
            picked = np.take_along_axis(fused, targets[..., None], -1)[..., 0]
            token = -(1 - eps) * picked - eps / vocab * fused.sum(-1)
            want = (token * weights).sum() / weights.sum()
        else:
            loss_sum, _, weight_sum = reference_cross_entropy(fused, targets, weights, 1e-4, 0.1)
            want = loss_sum / weight_sum
        objective = Seq2SeqObjective(z_loss=1e-4, label_smoothing=0.1)
        loss, metrics = objective(model, params, batch, objective.normalizers(batch), None)
        tol = 64 * EPS32 * (np.abs(fused).max() + np.log(vocab))
        np.testing.assert_allclose(float(loss), want, rtol=0, atol=tol)
        if as_is:  # No z-loss on the unnormalised score.
            assert float(metrics["z_loss"]) == 0.0
        elif mode in ("hard", "gate"):  # The renormalised cross-entropy keeps t5x's z-loss.
            assert float(metrics["z_loss"]) > 0
        e2s2 = E2S2Objective(
            nll_noised_weight=1.0,
            nll_masked_weight=0.0,
            denoise_weight=0.0,
            contrast_weight=0.0,
            z_loss=1e-4,
            label_smoothing=0.1,
        )
        e2s2_batch = {**batch, "encoder_input_tokens_noised": encoder_tokens}
        e2s2_loss, _ = e2s2(model, params, e2s2_batch, e2s2.normalizers(e2s2_batch), None)
        np.testing.assert_allclose(float(e2s2_loss), float(loss), rtol=0, atol=tol)


# ----------------------------------------------------------------------------- gradients


def test_source_path_gradients_reach_only_the_embeddings_through_the_values():
    """A loss of z_src alone: zero gradient for every encoder and decoder parameter (queries
    and keys are stopped), non-zero for the embedding rows of the (non-pad) source tokens."""
    model = fusion_model(mode="hard")
    encoder_tokens = jnp.asarray([[5, 6, 7, 8, 1, 0, 0], [9, 10, 11, 1, 0, 0, 0]], jnp.int32)
    decoder_tokens = jnp.asarray([[0, 20, 21, 22], [0, 23, 24, 25]], jnp.int32)
    params = init_params(model, encoder_tokens, decoder_tokens)
    params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=1)

    def source_loss(params):
        _, state = model.apply(
            {"params": params}, encoder_tokens, decoder_tokens, mutable=["intermediates"]
        )
        source_logits = state["intermediates"]["output_layer"]["source_logits"][0]
        return -jnp.mean(jax.nn.log_softmax(source_logits)[..., 3])

    grads = jax.jit(jax.grad(source_loss))(params)
    for stack in ("encoder", "decoder"):
        for path, grad in traverse_util.flatten_dict(grads[stack]).items():
            assert np.all(np.asarray(grad) == 0), (stack, path)
    for path, grad in traverse_util.flatten_dict(grads["output_layer"]).items():
        assert np.any(np.asarray(grad) != 0), path
    rows_with_gradient = np.flatnonzero(np.abs(grads["token_embedder"]["embedding"]).sum(1))
    np.testing.assert_array_equal(rows_with_gradient, [1, 5, 6, 7, 8, 9, 10, 11])

    # The fused loss, in contrast, trains the encoder and decoder through z_dec.
    def fused_loss(params):
        fused = model.apply({"params": params}, encoder_tokens, decoder_tokens)
        return -jnp.mean(fused[..., 3])

    fused_grads = jax.jit(jax.grad(fused_loss))(params)
    assert np.any(np.asarray(fused_grads["decoder"]["final_norm"]["scale"]) != 0)


# ----------------------------------------------------------------------------- identities


def test_zero_initialised_w2_makes_f_the_identity():
    features = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    ffn = ResidualFeedForward(TINY)
    params = nn.unbox(ffn.init(jax.random.PRNGKey(1), features)["params"])
    assert np.all(np.asarray(params["wo"]["kernel"]) == 0)
    assert np.any(np.asarray(params["wi"]["kernel"]) != 0)
    np.testing.assert_array_equal(ffn.apply({"params": params}, features), features)
    trained = randomize(params, ("wo", "kernel"), seed=2)
    assert not np.allclose(ffn.apply({"params": trained}, features), features, atol=1e-3)


@pytest.mark.parametrize("tie", [False, True])
def test_hard_fusion_with_lam_1_equals_the_plain_model(tie):
    """A plain model's params, with the fusion's new params added (as fine-tuning from an
    imported T5 does): log_softmax of the plain logits, and the plain param paths unchanged."""
    config = T5Config(**{**TINY.__dict__, "tie_word_embeddings": tie, "scale_decoder_outputs": tie})
    encoder_tokens, decoder_tokens = tokens(2), tokens(3, (3, 6), pad_from=None)
    plain = T5(config)
    plain_params = init_params(plain, encoder_tokens, decoder_tokens, seed=0)
    fused_model = fusion_model(config, mode="hard", lam=1.0)
    fusion_params = init_params(fused_model, encoder_tokens, decoder_tokens, seed=1)
    plain_flat = traverse_util.flatten_dict(plain_params)
    fusion_flat = traverse_util.flatten_dict(fusion_params)
    assert set(plain_flat) <= set(fusion_flat)
    new = {path[:2] for path in set(fusion_flat) - set(plain_flat)}
    assert new == {("output_layer", "surface_attention"), ("output_layer", "residual_ffn")}
    if not tie:
        assert ("output_layer", "logits_dense", "kernel") in plain_flat
    merged = traverse_util.unflatten_dict({**fusion_flat, **plain_flat})

    plain_logits = plain.apply({"params": plain_params}, encoder_tokens, decoder_tokens)
    fused = fused_model.apply({"params": merged}, encoder_tokens, decoder_tokens)
    # Two float32 programs (the fusion layer's path at lam 1 and the plain head): a few
    # roundings of the log-probabilities' scale apart.
    assert_close_to_scale(fused, jax.nn.log_softmax(plain_logits), ulps=16)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "variant,scan",
    [(f"fusion:{m}", False) for m in FUSION_MODES]
    + [("fusion:gate", True)]
    + [(b, scan) for b in BASELINES for scan in (False, True)],
)
def test_cached_decoding_equals_the_full_decoder(variant, scan):
    config = T5Config(**{**TINY.__dict__, "scan_layers": scan})
    if variant.startswith("fusion:"):
        model = fusion_model(config, mode=variant.split(":")[1], lam=0.6, tau=0.8)
    else:
        model = T5(config, encoder_fusion_factory=BASELINES[variant])
    encoder_tokens = tokens(4)
    decoder_tokens = tokens(5, (3, 14), pad_from=None).at[:, 0].set(0)
    params = init_params(model, encoder_tokens, decoder_tokens)
    if variant.startswith("fusion:"):
        params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=1)
    else:  # Non-uniform layer weights, so that the layer choice matters.
        params = randomize_layer_scores(params, scale=1.0)
    full = jax.jit(model.apply)({"params": params}, encoder_tokens, decoder_tokens)
    cached, cache = cached_decoder_steps(model, params, encoder_tokens, decoder_tokens)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
    if variant.startswith("fusion:"):  # The source keys/values are cached once.
        source_key = cache["output_layer"]["surface_attention"]["source_key"]
        assert source_key.shape == (3, 11, 32)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_beam_search_and_greedy_run_with_fusion(mode):
    model = fusion_model(mode=mode)
    encoder_tokens = tokens(6)
    params = init_params(model, encoder_tokens, encoder_tokens[:, :4])
    params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=1)
    greedy = make_predict_fn(model, DecodeConfig("greedy", max_decode_length=8))(
        params, encoder_tokens
    )
    beam = make_predict_fn(
        model,
        DecodeConfig(
            "beam", max_decode_length=8, num_beams=3, length_penalty=0.0, stop_bound="max_length"
        ),
    )(params, encoder_tokens)
    assert beam.tokens.shape == (3, 3, 8)
    assert np.all(np.isfinite(np.asarray(beam.scores)))
    assert np.all(np.asarray(beam.scores[:, 0]) >= np.asarray(greedy.scores) - 1e-5)

    # Greedy picks the argmax of the fused distribution, step by step (uncached reference).
    reference, _ = uncached_greedy(model, params, encoder_tokens, 8)
    ended = np.cumsum(np.cumsum(reference == 1, 1), 1) > 1
    np.testing.assert_array_equal(greedy.tokens, np.where(ended, 0, reference))


def chosen_scores(model, params, encoder_tokens, chosen):
    """Per-step scores (float64) of the tokens `chosen` `[rows, length]` for the encoder input
    rows `encoder_tokens` `[rows, ...]`, from one teacher-forced full-decoder pass: the fused
    score as is, and its log_softmax, both `[rows, length]` with 0 after the first eos."""
    decoder = jnp.concatenate([jnp.zeros((chosen.shape[0], 1), jnp.int32), chosen[:, :-1]], 1)
    fused = np.asarray(model.apply({"params": params}, encoder_tokens, decoder), np.float64)
    chosen = np.asarray(chosen)
    after_eos = np.cumsum(np.cumsum(chosen == 1, 1), 1) > 1
    return tuple(
        np.where(after_eos, 0.0, np.take_along_axis(scores, chosen[..., None], -1)[..., 0])
        for scores in (fused, np_log_softmax(fused))
    )


@pytest.mark.parametrize("mode,renormalize", [("hard", False), ("gate", False), ("hard", True)])
def test_decoding_scores_are_the_fused_scores_as_is(mode, renormalize):
    """hard/gate decoding ranks by the fused score as is (by default): each beam's score (no
    length penalty) is the sum of the fused scores of its tokens, recomputed by a full decoder
    pass, and greedy's and sampling's per-token scores are the fused scores of the chosen
    tokens; with `renormalize=True`, the same with `log_softmax(fused)`. The two differ by the
    summed `logsumexp(fused) < 0` (asserted well above the tolerance). Tolerance: 64 float32
    ulps of the summed magnitudes (cached decoding against the full decoder, both float32; the
    measured differences are below 8)."""
    model = fusion_model(mode=mode, lam=0.6, renormalize=renormalize)
    encoder_tokens = tokens(12)
    params = init_params(model, encoder_tokens, encoder_tokens[:, :4])
    params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=3, scale=1.0)
    if mode == "gate":  # Gates spread around 0.5, not saturated.
        params = randomize(params, ("output_layer", "gate", "decoder_weights"), seed=4, scale=0.05)
    beam = make_predict_fn(
        model,
        DecodeConfig(
            "beam", max_decode_length=8, num_beams=3, length_penalty=0.0, stop_bound="max_length"
        ),
    )(params, encoder_tokens)
    greedy = make_predict_fn(model, DecodeConfig("greedy", max_decode_length=8))(
        params, encoder_tokens
    )
    # Sampling scores as greedy does (`decoding._log_probs`); one mode checks it here.
    sample = greedy
    if (mode, renormalize) == ("hard", False):
        sample = make_predict_fn(model, DecodeConfig("sample", max_decode_length=8))(
            params, encoder_tokens, jax.random.PRNGKey(0)
        )
    # All 15 decoded rows (3 beams of each of the 3 inputs, greedy's, sampling's) in one pass.
    chosen = jnp.concatenate([beam.tokens.reshape(9, 8), greedy.tokens, sample.tokens])
    inputs = jnp.concatenate(
        [jnp.repeat(encoder_tokens, 3, axis=0), encoder_tokens, encoder_tokens]
    )
    as_is, renormalized = chosen_scores(model, params, inputs, chosen)
    steps, other = (renormalized, as_is) if renormalize else (as_is, renormalized)
    tol = 64 * EPS32 * np.abs(steps).sum(1).max()
    np.testing.assert_allclose(beam.scores.reshape(9), steps[:9].sum(1), rtol=0, atol=tol)
    assert np.all(np.abs(other[:9].sum(1) - steps[:9].sum(1)) > 100 * tol)
    for result, rows in ((greedy, steps[9:12]), (sample, steps[12:])):
        np.testing.assert_allclose(result.token_log_probs, rows, rtol=0, atol=tol)
        np.testing.assert_allclose(result.scores, rows.sum(1), rtol=0, atol=tol)


@pytest.mark.parametrize("mode", ["hard", "gate"])
def test_beam_search_on_shared_source_cache_equals_repeated_cache(mode, monkeypatch):
    """Beams of a row attend one copy of its surface-attention source keys/values (padded row
    included); beams and scores equal those over a copy per beam."""
    model = fusion_model(mode=mode, lam=0.5)
    encoder_tokens = tokens(7)
    params = init_params(model, encoder_tokens, encoder_tokens[:, :4])
    params = randomize(params, ("output_layer", "residual_ffn", "wo", "kernel"), seed=2)
    shared, _ = beam_search_shared_and_repeated(model, params, encoder_tokens, monkeypatch)
    assert len({tuple(np.asarray(row)) for row in shared.tokens[0]}) == 3  # distinct beams


# ----------------------------------------------------------------------------- baselines


def randomize_layer_scores(params, scale: float = 1.0, top_only: float | None = None):
    """Random `layer_scores` (or, with `top_only`, `top_only` on the last layer, 0 elsewhere)."""
    flat = traverse_util.flatten_dict(params)
    for i, path in enumerate(sorted(p for p in flat if p[-1] == "layer_scores")):
        shape = flat[path].shape
        if top_only is None:
            flat[path] = scale * jax.random.normal(jax.random.PRNGKey(i), shape)
        else:
            flat[path] = jnp.zeros(shape).at[-1].set(top_only)
    return traverse_util.unflatten_dict(flat)


def test_layerwise_coordination_maps_equal_depths_one_to_one():
    assert [coordinated_encoder_layer(j, 4, 4) for j in range(4)] == [1, 2, 3, 4]
    assert [coordinated_encoder_layer(j, 2, 4) for j in range(4)] == [1, 1, 2, 2]
    assert [coordinated_encoder_layer(j, 4, 2) for j in range(2)] == [2, 4]


@pytest.mark.parametrize("baseline", ["layer_attention", "fine_grained_layer_attention"])
def test_layer_attention_on_the_top_layer_only_equals_the_plain_model(baseline):
    """All softmax weight on the last encoder layer: every decoder layer's memory is the
    encoder's final output, as in T5. (Uniform at init: the layers are averaged.)"""
    encoder_tokens, decoder_tokens = tokens(8), tokens(9, (3, 5), pad_from=None)
    model = T5(TINY, encoder_fusion_factory=BASELINES[baseline])
    params = init_params(model, encoder_tokens, decoder_tokens)
    scores = params["decoder"]["layers_0"]["encoder_layer_attention"]["layer_scores"]
    expected_shape = (3,) if baseline == "layer_attention" else (3, 32)
    assert scores.shape == expected_shape and np.all(np.asarray(scores) == 0)
    plain = T5(TINY)
    plain_params = {**params, "decoder": dict(params["decoder"])}
    for name, layer in plain_params["decoder"].items():
        if name.startswith("layers_"):
            plain_params["decoder"][name] = {
                k: v for k, v in layer.items() if k != "encoder_layer_attention"
            }
    expected = plain.apply({"params": plain_params}, encoder_tokens, decoder_tokens)
    focused = randomize_layer_scores(params, top_only=1e4)
    # Another program (a softmax over layer scores of weight ~1 on the top layer): the logits
    # are a few roundings of their scale apart (tests/numerics.py).
    assert_close_to_scale(
        model.apply({"params": focused}, encoder_tokens, decoder_tokens), expected, ulps=16
    )
    averaged = model.apply({"params": params}, encoder_tokens, decoder_tokens)
    assert not np.allclose(averaged, expected, atol=1e-3)


@pytest.mark.parametrize("factory", ["dense", 3, "layer_attention", "LayerwiseCoordination"])
def test_a_bad_encoder_fusion_factory_is_rejected(factory):
    """Not a factory (an unknown name, a number, the name of a baseline instead of the class):
    a ValueError that names the setting and the baselines to choose from, or for a baseline's
    name its class and Gin file."""
    model = T5(TINY, encoder_fusion_factory=factory)
    with pytest.raises(ValueError, match="encoder_fusion_factory") as raised:
        init_params(model, tokens(0), tokens(1, (3, 4)))
    message = str(raised.value)
    for cls in BASELINES.values():
        assert cls.__name__ in message
    if factory == "layer_attention":
        assert "@LayerAttention" in message and "encoder_fusion_layer_attention.gin" in message
    if factory == "LayerwiseCoordination":
        assert "encoder_fusion_layerwise_coordination.gin" in message


# ----------------------------------------------------------------------------- Gin


GIN_FILES = sorted(
    str(p.relative_to(REPO))
    for pattern in ("surface_fusion*.gin", "encoder_fusion*.gin")
    for p in (REPO / "gin" / "models").glob(pattern)
)


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_gin_file_builds_and_inits_the_tiny_model(gin_file):
    gin = pytest.importorskip("gin")
    import e2s2_jax.configurables  # noqa: F401

    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [str(REPO / "gin/models/t5_1_1_tiny.gin"), str(REPO / gin_file)],
            ["T5.config = %MODEL_CONFIG"],
        )
        model = gin.get_configurable("e2s2_jax.T5")()
        encoder_tokens, decoder_tokens = jnp.ones((2, 6), jnp.int32), jnp.ones((2, 3), jnp.int32)
        params = init_params(model, encoder_tokens, decoder_tokens)
        output = model.apply({"params": params}, encoder_tokens, decoder_tokens)
    finally:
        gin.clear_config()
    assert output.shape == (2, 3, 8192)
    assert model.config.d_model == 64
    paths = {"/".join(path) for path in traverse_util.flatten_dict(params)}
    assert "output_layer/logits_dense/kernel" in paths
    if "surface_fusion" in gin_file:
        assert "output_layer/surface_attention/value/kernel" in paths
        mode = Path(gin_file).stem.removeprefix("surface_fusion").strip("_")
        assert ("output_layer/gate/decoder_weights" in paths) == (mode == "gate")
    else:
        baseline = Path(gin_file).stem.removeprefix("encoder_fusion_")
        assert issubclass(model.encoder_fusion_factory, BASELINES[baseline])
        has_scores = any("layer_scores" in p for p in paths)
        assert has_scores == (baseline != "layerwise_coordination")


# ----------------------------------------------------------------------------- training


def restore_task_batches(num_batches: int, batch_size: int = 16, length: int = 12, seed: int = 0):
    """A small seq2seq task from the bundled corpus: restore a sentence in which a quarter of
    the words were replaced by a mask token. Words are the corpus's 250 most frequent (others
    map to one unknown id); ids: 0 pad, 1 eos, 2 mask, 3 unknown."""
    with gzip.open(REPO / "data/corpus/train.txt.gz", "rt") as corpus:
        words = re.findall(r"[a-z]+", " ".join(corpus.readline() for _ in range(400)).lower())
    vocab = {w: i + 4 for i, (w, _) in enumerate(Counter(words).most_common(250))}
    ids = np.array([vocab.get(w, 3) for w in words], np.int32)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        starts = rng.integers(0, len(ids) - length, batch_size)
        targets = np.stack([ids[s : s + length - 1] for s in starts])
        targets = np.concatenate([targets, np.ones((batch_size, 1), np.int32)], 1)
        masked = (rng.random(targets.shape) < 0.25) & (targets != 1)
        batches.append(
            {
                "encoder_input_tokens": np.where(masked, 2, targets).astype(np.int32),
                "decoder_input_tokens": np.concatenate(
                    [np.zeros((batch_size, 1), np.int32), targets[:, :-1]], 1
                ),
                "decoder_target_tokens": targets,
            }
        )
    return batches


TRAIN_VARIANTS = [f"fusion:{m}" for m in FUSION_MODES] + list(BASELINES)


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_tiny_model_learns_to_restore_sentences(variant):
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import optimizers, partitioning
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    config = T5Config(
        vocab_size=256,
        d_model=32,
        num_heads=2,
        d_kv=16,
        d_ff=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.1,
    )
    if variant.startswith("fusion:"):
        model = fusion_model(config, mode=variant.split(":")[1])
    else:
        model = T5(config, encoder_fusion_factory=BASELINES[variant])
    optimizer = optimizers.make_optimizer("adamw_rms_scaled", 3e-2)
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = make_train_step(model, optimizer, Seq2SeqObjective(), mesh, state_shardings=shardings)
    losses = []
    for i, batch in enumerate(restore_task_batches(40)):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["cross_entropy"]))
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 1.0, (first, last)


@pytest.mark.parametrize("scan", [False, True])
def test_fusion_params_have_shardable_logical_axes(scan):
    """Every new parameter has logical axes the partitioning rules can map (a scanned layer's
    encoder-layer axis must not reuse the name "layers" of the scan axis)."""
    from e2s2_jax.training import optimizers, partitioning
    from e2s2_jax.training.train_state import train_state_shardings

    config = T5Config(**{**TINY.__dict__, "scan_layers": scan})
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    optimizer = optimizers.make_optimizer("adafactor", 1e-3)
    for model in (
        T5(config, encoder_fusion_factory=FineGrainedLayerAttention),
        fusion_model(config, mode="gate"),
    ):
        _, shardings = train_state_shardings(model, optimizer, mesh)
        flat = traverse_util.flatten_dict(shardings.params)
        new = [p for p in flat if "encoder_layer_attention" in p or p[0] == "output_layer"]
        assert len(new) >= 2
        for path in new:
            assert len(flat[path].spec) <= 4, path
