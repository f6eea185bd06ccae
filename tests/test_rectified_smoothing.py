"""Rectified label smoothing's reference pass (self-evolution learning): the objective smooths
towards the model's own prediction on the *uncorrupted* text (the authors' `net_input_ref`), and
the task and feature converter carry that text, packed in step with the corrupted example.

Against independent computations: the packed objective's value equals NumPy's rectified loss of
each example run alone, its gradient equals the per-example JAX loss's, and the uncorrupted
text of every packed segment is the corrupted inputs restored with their targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from numerics import assert_close_to_scale
from preprocessor_helpers import PIECES, uncorrupt
from test_informed_masking import scored_dataset
from test_losses import reference_rectified
from test_train_step import tiny_config

from e2s2_jax import losses
from e2s2_jax.data import informed_masking
from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter
from e2s2_jax.data.preprocessors import pretraining_output_features
from e2s2_jax.errors import ConfigError
from e2s2_jax.models.t5 import T5
from e2s2_jax.objectives import REFERENCE_SEGMENT_IDS, REFERENCE_TOKENS, Seq2SeqObjective

VOCAB = 64
ENCODER, REFERENCE, DECODER = 16, 20, 8
SMOOTHING = 0.2


def random_examples(rng, count):
    """Examples as the task makes them: a reference text, a shorter corrupted input, a target
    (random tokens: the objective does not read their relation)."""
    examples = []
    for _ in range(count):
        n = int(rng.integers(4, 9))
        examples.append(
            {
                "reference": rng.integers(2, VOCAB, n + 2).astype(np.int32),
                "inputs": rng.integers(2, VOCAB, n).astype(np.int32),
                "targets": rng.integers(2, VOCAB, int(rng.integers(2, 5))).astype(np.int32),
            }
        )
    return examples


def pack(rows):
    """Packs rows of examples as SeqIO does: segment k of a row is the same example in every
    feature; decoder inputs restart (0) at each segment."""
    names = {
        "encoder_input_tokens": ("inputs", ENCODER),
        REFERENCE_TOKENS: ("reference", REFERENCE),
        "decoder_target_tokens": ("targets", DECODER),
    }
    segments = {
        "encoder_input_tokens": "encoder_segment_ids",
        REFERENCE_TOKENS: REFERENCE_SEGMENT_IDS,
        "decoder_target_tokens": "decoder_segment_ids",
    }
    batch = {}
    for name, (key, length) in names.items():
        tokens = np.zeros((len(rows), length), np.int32)
        segment_ids = np.zeros((len(rows), length), np.int32)
        for row, examples in enumerate(rows):
            at = 0
            for segment, example in enumerate(examples, start=1):
                values = example[key]
                tokens[row, at : at + len(values)] = values
                segment_ids[row, at : at + len(values)] = segment
                at += len(values)
        batch[name], batch[segments[name]] = tokens, segment_ids
    targets, decoder_segments = batch["decoder_target_tokens"], batch["decoder_segment_ids"]
    shifted = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    starts = decoder_segments != np.concatenate(
        [np.zeros_like(decoder_segments[:, :1]), decoder_segments[:, :-1]], axis=1
    )
    batch["decoder_input_tokens"] = np.where(starts, 0, shifted).astype(np.int32)
    batch["decoder_loss_weights"] = (targets != 0).astype(np.int32)
    return {key: jnp.asarray(value) for key, value in batch.items()}


def alone(model, params, example, encoder_key):
    """The model's logits on one example in a row of its own, no packing, no dropout."""
    targets = example["targets"][None]
    decoder_inputs = np.concatenate([[[0]], targets[:, :-1]], axis=1).astype(np.int32)
    return model.apply(
        {"params": params},
        jnp.asarray(example[encoder_key][None]),
        jnp.asarray(decoder_inputs),
        jnp.asarray(targets),
        None,
        None,
        enable_dropout=False,
    )


@pytest.fixture(scope="module")
def setup():
    model = T5(tiny_config())
    rng = np.random.default_rng(3)
    examples = random_examples(rng, 5)
    batch = pack([examples[:2], examples[2:4], examples[4:]])
    params = model.init(
        jax.random.PRNGKey(0),
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
    )["params"]
    return model, params, examples, batch


def objective_loss(model, params, batch, smoothing=SMOOTHING):
    objective = Seq2SeqObjective(z_loss=0.0, rectified_label_smoothing=smoothing)
    loss, _ = objective(model, params, batch, objective.normalizers(batch), None)
    return loss


def test_loss_is_numpys_rectified_loss_with_the_uncorrupted_text_as_reference(setup):
    """Tolerance: each of the 15 target tokens' loss is a sum of 64 terms of size at most
    ~max|logit| + log(64); the packed and one-example passes round differently (other shapes,
    masked padding), a few eps32 of each term: 64 eps32 of the summed magnitudes bounds it."""
    model, params, examples, batch = setup
    # One compiled program for the ten passes (eager dispatch of each op is slow).
    passes = jax.jit(
        lambda p: [
            (alone(model, p, example, "inputs"), alone(model, p, example, "reference"))
            for example in examples
        ]
    )(params)
    total = weights = magnitude = 0.0
    for example, (logits, reference) in zip(examples, passes, strict=True):
        logits, reference = np.asarray(logits)[0], np.asarray(reference)[0]
        ones = np.ones(len(example["targets"]))
        value, _, _ = reference_rectified(
            logits, example["targets"], ones, SMOOTHING, 0.0, reference
        )
        total += value
        weights += ones.sum()
        magnitude += (np.abs(logits).max(-1) * 2 + np.log(VOCAB) + 1).sum()
    loss = float(jax.jit(lambda p: objective_loss(model, p, batch))(params))
    eps32 = np.finfo(np.float32).eps
    np.testing.assert_allclose(loss, total / weights, rtol=0, atol=64 * eps32 * magnitude / weights)
    # Not the same-pass smoothing, which is (1 - a) times KL(y || p) = (1 - a) CE: the
    # reference input changes the target distribution.
    plain = Seq2SeqObjective(z_loss=0.0)
    same_pass = (1 - SMOOTHING) * jax.jit(
        lambda p: plain(model, p, batch, plain.normalizers(batch), None)[0]
    )(params)
    assert abs(loss - float(same_pass)) > 1e3 * eps32 * abs(float(same_pass))


def test_gradient_equals_the_per_example_loss_and_not_the_scaled_hard_label_one(setup):
    """The packed objective's gradient against the gradient of the one-example losses' sum
    (references detached), per parameter. Tolerance: both are sums over the same 15 tokens
    through the same 4 layers, in different orders and shapes: 128 eps32 of each parameter's
    largest gradient entry."""
    model, params, examples, batch = setup
    weights = sum(len(e["targets"]) for e in examples)

    def per_example(p):
        total = 0.0
        for example in examples:
            reference = jax.lax.stop_gradient(alone(model, p, example, "reference"))
            value, _, _ = losses.rectified_cross_entropy_with_logits(
                alone(model, p, example, "inputs"),
                jnp.asarray(example["targets"][None]),
                None,
                rectified_label_smoothing=SMOOTHING,
                reference_logits=reference,
            )
            total += value
        return total / weights

    grads = jax.jit(jax.grad(lambda p: objective_loss(model, p, batch)))(params)
    want = jax.jit(jax.grad(per_example))(params)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        expected = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        assert_close_to_scale(got, expected, ulps=128, err_msg=jax.tree_util.keystr(path))
    plain = Seq2SeqObjective(z_loss=0.0)
    hard = jax.jit(jax.grad(lambda p: plain(model, p, batch, plain.normalizers(batch), None)[0]))(
        params
    )
    difference = max(
        float(jnp.max(jnp.abs(g - (1 - SMOOTHING) * h)) / jnp.max(jnp.abs(h)))
        for g, h in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(hard), strict=True
        )
    )
    assert difference > 1e-3, difference


def test_a_batch_without_the_uncorrupted_text_is_refused(setup):
    model, params, _, batch = setup
    plain_batch = {
        key: value
        for key, value in batch.items()
        if key not in (REFERENCE_TOKENS, REFERENCE_SEGMENT_IDS)
    }
    with pytest.raises(ConfigError, match="self_evolution_task"):
        objective_loss(model, params, plain_batch)


@pytest.mark.parametrize("pack_rows", [True, False])
def test_the_uncorrupted_text_travels_in_step_with_its_example(vocabulary, pack_rows):
    """Informed span corruption, eos, then the converter: in every row, segment k's reference
    tokens are segment k's inputs restored with segment k's targets (then eos)."""
    rng = np.random.default_rng(1)
    documents = [rng.integers(3, PIECES, size=int(n)) for n in rng.integers(10, 40, size=40)]
    scores = [rng.gamma(1.0, 2.0, size=len(d)).astype(np.float32) for d in documents]
    features = {
        **pretraining_output_features(vocabulary),
        informed_masking.REFERENCE_INPUTS: seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }
    with seqio.utils.map_seed_manager(5):
        dataset = informed_masking.informed_span_corruption(
            scored_dataset(documents, scores), features
        )
    dataset = seqio.preprocessors.append_eos_after_trim(dataset, features)
    lengths = {"inputs": 64, "targets": 16}
    converter = E2S2EncDecFeatureConverter(pack=pack_rows)
    rows = list(converter(dataset, lengths).as_numpy_iterator())
    model_lengths = converter.get_model_feature_lengths(lengths)
    assert model_lengths[REFERENCE_TOKENS] == 80
    eos = vocabulary.eos_id
    restored = []
    for row in rows:
        assert row[REFERENCE_TOKENS].shape == (80,)
        if not pack_rows:
            segments = {1: (row["encoder_input_tokens"] != 0, row["decoder_target_tokens"] != 0,
                            row[REFERENCE_TOKENS] != 0)}  # fmt: skip
        else:
            segments = {
                k: (
                    row["encoder_segment_ids"] == k,
                    row["decoder_segment_ids"] == k,
                    row[REFERENCE_SEGMENT_IDS] == k,
                )
                for k in range(1, row["encoder_segment_ids"].max() + 1)
            }
        for inputs_at, targets_at, reference_at in segments.values():
            inputs = row["encoder_input_tokens"][inputs_at]
            targets = row["decoder_target_tokens"][targets_at]
            reference = row[REFERENCE_TOKENS][reference_at]
            assert inputs[-1] == targets[-1] == reference[-1] == eos
            document = uncorrupt(inputs[:-1], targets[:-1], vocabulary)
            np.testing.assert_array_equal(reference[:-1], document)
            restored.append(tuple(document))
    # Every document arrived once, none lost to the longer third feature.
    assert sorted(restored) == sorted(tuple(d) for d in documents)
