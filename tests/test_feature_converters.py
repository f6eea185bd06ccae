"""Tests of the E2S2 encoder-decoder feature converter: packing, unpacking, the second view."""

import numpy as np
import pytest
import tensorflow as tf

from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter, packing_efficiency

LENGTHS = {"inputs": 64, "targets": 24}
MODEL_FEATURES = {
    "encoder_input_tokens",
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
}
NOISED_FEATURES = {"encoder_input_tokens_noised", "encoder_noise_labels"}


def make_examples(num_examples=200, seed=0, with_noised_view=True):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(num_examples):
        num_inputs = int(rng.integers(2, LENGTHS["inputs"] + 1))
        num_targets = int(rng.integers(1, LENGTHS["targets"] + 1))
        example = {
            "inputs": np.append(rng.integers(3, 1000, num_inputs - 1), 1).astype(np.int32),
            "targets": np.append(rng.integers(3, 1000, num_targets - 1), 1).astype(np.int32),
        }
        if with_noised_view:
            labels = rng.choice([0, 0, 0, 1, 2], size=num_inputs).astype(np.int32)
            labels[-1] = 0  # eos is never touched
            noised = np.where(labels > 0, rng.integers(3, 1000, num_inputs), example["inputs"])
            example["inputs_noised"] = noised.astype(np.int32)
            example["noise_labels"] = labels
        examples.append(example)
    return examples


def to_dataset(examples):
    keys = examples[0].keys()
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={key: tf.TensorSpec([None], tf.int32) for key in keys},
    )


def unpack(row):
    """NumPy reference: splits one packed row into its examples by segment ids."""
    examples = []
    for segment in range(1, int(row["encoder_segment_ids"].max()) + 1):
        encoder = row["encoder_segment_ids"] == segment
        decoder = row["decoder_segment_ids"] == segment
        example = {
            "inputs": row["encoder_input_tokens"][encoder],
            "targets": row["decoder_target_tokens"][decoder],
            "decoder_input_tokens": row["decoder_input_tokens"][decoder],
            "encoder_positions": row["encoder_positions"][encoder],
            "decoder_positions": row["decoder_positions"][decoder],
            "decoder_loss_weights": row["decoder_loss_weights"][decoder],
        }
        if "encoder_input_tokens_noised" in row:
            example["inputs_noised"] = row["encoder_input_tokens_noised"][encoder]
            example["noise_labels"] = row["encoder_noise_labels"][encoder]
        examples.append(example)
    return examples


def test_packing_then_unpacking_gives_back_the_examples():
    examples = make_examples()
    converter = E2S2EncDecFeatureConverter(pack=True)
    packed = list(converter(to_dataset(examples), LENGTHS).as_numpy_iterator())
    assert set(packed[0]) == MODEL_FEATURES | NOISED_FEATURES
    assert len(packed) < len(examples)  # packing did pack

    unpacked = [example for row in packed for example in unpack(row)]
    assert len(unpacked) == len(examples)
    for original, restored in zip(examples, unpacked, strict=True):
        for key in ("inputs", "targets", "inputs_noised", "noise_labels"):
            np.testing.assert_array_equal(restored[key], original[key], err_msg=key)
        np.testing.assert_array_equal(
            restored["encoder_positions"], np.arange(len(original["inputs"]))
        )
        np.testing.assert_array_equal(
            restored["decoder_positions"], np.arange(len(original["targets"]))
        )
        # Decoder inputs: targets shifted right with 0 first, restarting in every segment.
        np.testing.assert_array_equal(
            restored["decoder_input_tokens"], np.append(0, original["targets"][:-1])
        )
        assert restored["decoder_loss_weights"].all()
    for row in packed:
        padding = row["encoder_segment_ids"] == 0
        assert not row["encoder_input_tokens"][padding].any()
        assert not row["encoder_input_tokens_noised"][padding].any()
        assert not row["encoder_noise_labels"][padding].any()
        assert not row["decoder_loss_weights"][row["decoder_segment_ids"] == 0].any()


def test_unpacked_conversion_pads_the_views_in_step():
    examples = make_examples(num_examples=20, seed=1)
    converter = E2S2EncDecFeatureConverter(pack=False)
    rows = list(converter(to_dataset(examples), LENGTHS).as_numpy_iterator())
    assert (
        set(rows[0])
        == {
            "encoder_input_tokens",
            "decoder_input_tokens",
            "decoder_target_tokens",
            "decoder_loss_weights",
        }
        | NOISED_FEATURES
    )
    for example, row in zip(examples, rows, strict=True):
        length = len(example["inputs"])
        np.testing.assert_array_equal(
            row["encoder_input_tokens_noised"][:length], example["inputs_noised"]
        )
        np.testing.assert_array_equal(row["encoder_noise_labels"][:length], example["noise_labels"])
        assert not row["encoder_noise_labels"][length:].any()
        assert row["encoder_input_tokens_noised"].shape == (LENGTHS["inputs"],)


def test_tasks_without_second_view_get_plain_features():
    examples = make_examples(num_examples=30, with_noised_view=False)
    converter = E2S2EncDecFeatureConverter(pack=True)
    packed = list(converter(to_dataset(examples), LENGTHS).as_numpy_iterator())
    assert set(packed[0]) == MODEL_FEATURES
    with pytest.raises(ValueError, match="inputs_noised"):
        E2S2EncDecFeatureConverter(pack=True, with_noised_view=True)(to_dataset(examples), LENGTHS)


def test_packing_efficiency_counts_non_pad_positions():
    examples = make_examples(num_examples=100, seed=2)
    converter = E2S2EncDecFeatureConverter(pack=True)
    batches = list(converter(to_dataset(examples), LENGTHS).batch(4).as_numpy_iterator())
    efficiency = packing_efficiency(batches)
    rows = sum(len(batch["encoder_input_tokens"]) for batch in batches)
    input_tokens = sum(len(example["inputs"]) for example in examples)
    target_tokens = sum(len(example["targets"]) for example in examples)
    assert efficiency["encoder"] == pytest.approx(input_tokens / (rows * LENGTHS["inputs"]))
    assert efficiency["decoder"] == pytest.approx(target_tokens / (rows * LENGTHS["targets"]))
    assert efficiency["examples_per_row"] == pytest.approx(len(examples) / rows)
    assert efficiency == packing_efficiency(converter(to_dataset(examples), LENGTHS).batch(4))


def test_model_feature_lengths_name_the_second_view():
    lengths = E2S2EncDecFeatureConverter(
        pack=True, with_noised_view=True
    ).get_model_feature_lengths(LENGTHS)
    assert set(lengths) == MODEL_FEATURES | NOISED_FEATURES
    assert lengths["encoder_input_tokens_noised"] == lengths["encoder_noise_labels"] == 64
    plain = E2S2EncDecFeatureConverter(pack=True).get_model_feature_lengths(LENGTHS)
    assert set(plain) == MODEL_FEATURES
