"""Tests of the SeqIO registrations in tasks/: import, batches, determinism, factories, SSR, C4."""

import importlib
import socket

import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks
from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter
from e2s2_jax.data.vocab import get_vocabulary
from tasks import registration

SPAN_LENGTHS = {"inputs": 512, "targets": 114}
FULL_LENGTHS = {"inputs": 512, "targets": 512}
PLAIN_FEATURES = {
    "encoder_input_tokens",
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
}
E2S2_FEATURES = PLAIN_FEATURES | {"encoder_input_tokens_noised", "encoder_noise_labels"}


def batches(name, lengths, num_batches=2, seed=5, split="validation"):
    dataset = seqio.get_dataset(
        name,
        lengths,
        E2S2EncDecFeatureConverter(pack=True),
        dataset_split=split,
        shuffle=True,
        seed=seed,
    )
    return list(dataset.batch(4).take(num_batches).as_numpy_iterator())


def test_importing_twice_registers_without_error():
    importlib.reload(tasks)
    importlib.reload(tasks)
    names = set(seqio.TaskRegistry.names())
    assert set(tasks.BUNDLED_TASKS.values()) <= names
    assert set(tasks.C4_TASKS.values()) <= names
    assert set(tasks.BUNDLED_MIXTURES) <= set(seqio.MixtureRegistry.names())


@pytest.mark.parametrize(
    "name, lengths, features",
    [
        ("bundled_span_corruption", SPAN_LENGTHS, PLAIN_FEATURES),
        ("bundled_full_reconstruction", FULL_LENGTHS, PLAIN_FEATURES),
        ("bundled_e2s2", SPAN_LENGTHS, E2S2_FEATURES),
        ("bundled_e2s2_full_reconstruction", FULL_LENGTHS, E2S2_FEATURES),
        ("bundled_span_corruption_and_full_reconstruction", FULL_LENGTHS, PLAIN_FEATURES),
        ("bundled_e2s2_and_e2s2_full_reconstruction", FULL_LENGTHS, E2S2_FEATURES),
    ],
)
def test_bundled_tasks_and_mixtures_produce_batches(name, lengths, features):
    produced = batches(name, lengths)
    assert len(produced) == 2
    for batch in produced:
        assert set(batch) == features
        assert batch["encoder_input_tokens"].shape == (4, lengths["inputs"])
        assert batch["decoder_target_tokens"].shape == (4, lengths["targets"])
        # Every example ends in eos and nothing was cut: targets hold their eos too.
        assert (batch["decoder_target_tokens"] == 1).sum() == batch["decoder_segment_ids"].max(
            axis=1
        ).sum()
        if "encoder_noise_labels" in batch:
            labels = batch["encoder_noise_labels"]
            assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()


def test_task_batches_are_deterministic_given_the_seed():
    first = batches("bundled_e2s2", SPAN_LENGTHS, num_batches=3, seed=11)
    again = batches("bundled_e2s2", SPAN_LENGTHS, num_batches=3, seed=11)
    other = batches("bundled_e2s2", SPAN_LENGTHS, num_batches=3, seed=12)
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), key
    assert any(
        a["encoder_input_tokens_noised"].tobytes() != c["encoder_input_tokens_noised"].tobytes()
        for a, c in zip(first, other, strict=True)
    )


@pytest.fixture(scope="module")
def vocabulary():
    return get_vocabulary()


def test_register_text_task_factory(tmp_path, vocabulary):
    (tmp_path / "train.txt").write_text(
        "It is a truth universally acknowledged.\n\nA second document, rather longer.\n" * 20
    )
    pattern = str(tmp_path / "*.txt")
    for _ in range(2):  # registering the same name again replaces it
        task = tasks.register_text_task("test_text_e2s2", pattern, "e2s2", vocabulary)
    assert seqio.get_mixture_or_task("test_text_e2s2") is task
    examples = list(
        task.get_dataset(SPAN_LENGTHS, split="train", shuffle=False, seed=0).as_numpy_iterator()
    )
    assert examples and {"inputs", "inputs_noised", "noise_labels", "targets"} <= set(examples[0])
    text = vocabulary.decode(np.concatenate([ex["inputs"] for ex in examples]).tolist())
    assert "truth" in text or "document" in text

    with pytest.raises(ValueError, match="objective='mlm'"):
        tasks.register_text_task("test_text_bad", pattern, "mlm", vocabulary)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        tasks.register_text_task(
            "test_text_missing", str(tmp_path / "nothing*.txt"), "e2s2", vocabulary
        )


def test_c4_registration_touches_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("registration opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tasks.register_c4_tasks()
    task = seqio.get_mixture_or_task("c4_e2s2")
    assert isinstance(task.source, seqio.TfdsDataSource)
    assert task.source.tfds_dataset.name == "c4/en:3.0.1"
    assert {"inputs_noised", "noise_labels"} <= set(task.output_features)


def write_ssr_records(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for inputs, targets, fill_score in records:
            feature = {
                "inputs": tf.train.Feature(bytes_list=tf.train.BytesList(value=[inputs.encode()])),
                "targets": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[targets.encode()])
                ),
                "fill_score": tf.train.Feature(float_list=tf.train.FloatList(value=[fill_score])),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


def test_ssr_task_round_trip_and_mixture(tmp_path, vocabulary):
    records = [
        (
            f"She <extra_id_0> walked {i} <extra_id_1> home.",
            f"<extra_id_0> slowly {i} <extra_id_1>",
            -0.5 * i,
        )
        for i in range(8)
    ]
    write_ssr_records(tmp_path / "ssr-00000-of-00001.tfrecord", records)
    task = tasks.register_ssr_task(
        "test_ssr", {"train": str(tmp_path / "ssr-*.tfrecord")}, vocabulary
    )
    examples = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    assert len(examples) == len(records)
    for (inputs, targets, fill_score), example in zip(records, examples, strict=True):
        assert example["inputs"][-1] == 1 and example["targets"][-1] == 1
        assert vocabulary.decode(example["inputs"][:-1].tolist()) == inputs
        assert vocabulary.decode(example["targets"][:-1].tolist()) == targets
        assert example["targets"][0] == vocabulary.vocab_size - 1  # <extra_id_0>
        assert example["fill_score"] == pytest.approx(fill_score)

    # SSR shares span corruption's features, so the two mix.
    registration.register_mixture(
        "test_ssr_and_span_corruption", ["test_ssr", "bundled_span_corruption"]
    )
    produced = batches("test_ssr_and_span_corruption", SPAN_LENGTHS, split="train")
    assert set(produced[0]) == PLAIN_FEATURES
