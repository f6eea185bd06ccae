"""Attention entropy: every layer's value equals a NumPy computation from the model's own
projected queries, keys and position biases, on padded rows, in both layer layouts and through
the train step's entropy variant (with gradient accumulation); the plain step is unchanged."""

from __future__ import annotations

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale
from test_train_step import synthetic_batch, tiny_config

from e2s2_jax import objectives
from e2s2_jax.models.t5 import T5

NEG_INF = -1.0e9


def _numpy_entropy(query, key, bias):
    """Head-averaged entropy `[batch, q]` of softmax(q.k + bias) in float64, with masked
    (NEG_INF) keys taking no probability."""
    scores = np.einsum("bhqd,bhkd->bhqk", query.astype(np.float64), key.astype(np.float64))
    logits = scores + bias
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return (-terms.sum(-1)).mean(1)


def _reference(model, params, batch, include_pad_queries=False):
    """`{"attention_entropy/<kind>/layer_<i>": mean}` computed in NumPy from the projections
    the model itself produced (captured intermediates): the masks are built here from the
    tokens, the softmax, entropy and averaging over non-pad queries are NumPy's."""
    _, state = model.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    captured = {
        "/".join(k[:-1]): np.asarray(v[0])
        for k, v in traverse_util.flatten_dict(state["intermediates"]).items()
        if len(k) > 1 and k[-2] in ("query", "key", "relpos_bias")
    }
    encoder_valid = np.asarray(batch["encoder_input_tokens"]) != 0
    decoder_valid = np.asarray(batch["decoder_target_tokens"]) != 0
    length = decoder_valid.shape[1]
    causal = np.arange(length)[:, None] >= np.arange(length)[None, :]
    masks = {
        "encoder_self": np.broadcast_to(
            encoder_valid[:, None, :], (*encoder_valid.shape, encoder_valid.shape[1])
        ),
        "decoder_self": decoder_valid[:, None, :] & causal[None],
        "cross": np.broadcast_to(
            encoder_valid[:, None, :], (len(encoder_valid), length, encoder_valid.shape[1])
        ),
    }
    relpos = {
        "encoder_self": captured["encoder/relpos_bias"],
        "decoder_self": captured["decoder/relpos_bias"],
        "cross": 0.0,
    }
    query_valid = {
        "encoder_self": encoder_valid,
        "decoder_self": decoder_valid,
        "cross": decoder_valid,
    }
    modules = {
        "encoder_self": "encoder/layers_{}/attention",
        "decoder_self": "decoder/layers_{}/self_attention",
        "cross": "decoder/layers_{}/encoder_decoder_attention",
    }
    reference = {}
    for kind, module in modules.items():
        for layer in range(2):
            path = module.format(layer)
            bias = relpos[kind] + np.where(masks[kind], 0.0, NEG_INF)[:, None]
            entropy = _numpy_entropy(captured[f"{path}/query"], captured[f"{path}/key"], bias)
            valid = np.ones_like(query_valid[kind]) if include_pad_queries else query_valid[kind]
            reference[f"attention_entropy/{kind}/layer_{layer}"] = entropy[valid].mean()
    return reference


def _padded_batch():
    batch = synthetic_batch(3, batch_size=8, length=8)
    # More padding in the encoder rows too, of different amounts per row.
    for row, keep in enumerate([8, 7, 5, 3, 6, 2, 8, 4]):
        batch["encoder_input_tokens"][row, keep:] = 0
    return {name: jnp.asarray(value) for name, value in batch.items()}


# Entropies are at most log(8) ~ 2 nats here. The model's float32 path rounds the scores
# (8-term dot products), their log-softmax (a log-sum-exp of at most 8 terms) and the entropy's
# sum of at most 8 terms: at worst about 16 float32 roundings of O(1) magnitudes per query, and
# means over a few dozen queries average them down. 16 rounding units of the entropy's scale
# (observed: under 0.5); a masking or averaging error is orders of magnitude larger (one pad
# query wrongly counted moves a layer's mean by ~1e-2, about 1e5 units).
ULPS = 16


@pytest.mark.parametrize("scan", [False, True])
def test_entropy_equals_numpy_on_padded_rows(scan):
    from e2s2_jax.models.attention_entropy import finish_entropy_metrics
    from e2s2_jax.models.t5 import scan_params

    config = tiny_config()
    model = T5(config)
    batch = _padded_batch()
    params = nn.unbox(
        model.init(jax.random.key(1), batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    )["params"]
    reference = _reference(model, params, batch)
    run_model, run_params = model, params
    if scan:
        run_model = T5(tiny_config(scan_layers=True, remat_policy="full"))
        run_params = scan_params(params)
    objective = objectives.Seq2SeqObjective()
    _, metrics = objective(
        run_model, run_params, batch, objective.normalizers(batch), None, attention_entropy=True
    )
    metrics = finish_entropy_metrics(metrics)
    for name, value in reference.items():
        assert_close_to_scale(metrics[name], value, ULPS, err_msg=name)
    for kind in ("encoder_self", "decoder_self", "cross"):
        layers = [reference[f"attention_entropy/{kind}/layer_{i}"] for i in range(2)]
        assert_close_to_scale(metrics[f"attention_entropy/{kind}"], np.mean(layers), ULPS)
    # The check sees padding: averaged over every query, pad ones included, the values move
    # by far more than the tolerance.
    unmasked = _reference(model, params, batch, include_pad_queries=True)
    for name, value in unmasked.items():
        assert abs(value - reference[name]) > 100 * ULPS * 1.2e-7 * abs(reference[name]), name


def test_train_step_entropy_variant_accumulates_exactly_and_leaves_the_plain_step_alone():
    import optax

    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    model = T5(tiny_config())
    optimizer = optax.adamw(1e-3)
    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    batch = _padded_batch()
    rng = jax.random.key(0)
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(1))
    reference = _reference(model, state.params, batch)
    objective = objectives.Seq2SeqObjective()

    def step(attention_entropy):
        fn = make_train_step(
            model,
            optimizer,
            objective,
            mesh,
            num_microbatches=2,
            state_shardings=shardings,
            donate_state=False,
            attention_entropy=attention_entropy,
        )
        return fn(state, batch, rng)

    plain_state, plain_metrics = step(False)
    entropy_state, entropy_metrics = step(True)
    assert not any(name.startswith("attention_entropy") for name in plain_metrics)
    # Only the finished means are reported, not the raw sums and counts.
    assert {n for n in entropy_metrics if n.startswith("attention_entropy")} == {
        *reference,
        "attention_entropy/encoder_self",
        "attention_entropy/decoder_self",
        "attention_entropy/cross",
    }
    for name, value in reference.items():
        assert_close_to_scale(entropy_metrics[name], value, ULPS, err_msg=name)
    # The same update either way (the entropy is a metric, not a loss term).
    assert float(entropy_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)
    for a, b in zip(
        jax.tree.leaves(plain_state.params), jax.tree.leaves(entropy_state.params), strict=True
    ):
        assert_close_to_scale(b, a, 16)
