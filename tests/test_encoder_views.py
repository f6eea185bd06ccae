"""The encoder-side views RTS, C-RTS and SLM over span corruption, against a NumPy reference
over 10,000 examples each: the substitution rate, special tokens never substituted, C-RTS
substitutes in the original's cluster, SLM targets; the empty view slot; bad settings."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import seqio
from preprocessor_helpers import is_sentinel, run, uncorrupt

from e2s2_jax.data import encoder_views, token_swaps, view_labels
from e2s2_jax.data.preprocessors import pretraining_output_features
from e2s2_jax.data.span_corruption import span_corruption
from e2s2_jax.errors import ConfigError

NUM_EXAMPLES = 10_000
NUM_CLUSTERS = 40


def documents(corpus_tokens, num_examples, seed=0):
    """`num_examples` corpus pieces of 8 to 120 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 121, num_examples)
    starts = rng.integers(0, len(corpus_tokens) - 121, num_examples)
    return [corpus_tokens[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def clusters_file(tmp_path, vocabulary) -> tuple[str, np.ndarray]:
    """A random token -> cluster table of NUM_CLUSTERS clusters, two of them singletons."""
    rng = np.random.default_rng(3)
    clusters = rng.integers(0, NUM_CLUSTERS - 2, vocabulary.vocab_size)
    regular = np.flatnonzero(token_swaps.regular_id_mask(vocabulary))
    clusters[regular[:2]] = [NUM_CLUSTERS - 2, NUM_CLUSTERS - 1]  # ids 3 and 4 alone
    path = tmp_path / "clusters.npy"
    np.save(path, clusters.astype(np.int32))
    return str(path), clusters


def view_examples(vocabulary, pieces, view, seed=0, **options):
    features = pretraining_output_features(vocabulary, with_noised_view=True)

    def preprocess(dataset, output_features):
        dataset = span_corruption(dataset, output_features)
        dataset = seqio.preprocessors.append_eos_after_trim(dataset, output_features)
        return encoder_views.add_encoder_view(dataset, output_features, view=view, **options)

    return run(preprocess, pieces, features, seed=seed)


@pytest.fixture(scope="module")
def swapped(vocabulary, corpus_tokens, tmp_path_factory):
    """{view: (pieces, examples)} for rts, c_rts and slm, and the cluster array."""
    pieces = documents(corpus_tokens, NUM_EXAMPLES)
    path, clusters = clusters_file(tmp_path_factory.mktemp("clusters"), vocabulary)
    results = {
        "rts": view_examples(vocabulary, pieces, "rts"),
        "c_rts": view_examples(vocabulary, pieces, "c_rts", cluster_file=path, seed=1),
        "slm": view_examples(vocabulary, pieces, "slm", seed=2),
    }
    return pieces, results, clusters


def numpy_special(tokens, vocabulary):
    return is_sentinel(tokens, vocabulary) | np.isin(tokens, [0, 1, 2])


@pytest.mark.parametrize("view", ["rts", "c_rts", "slm"])
def test_swapped_views_against_numpy(swapped, vocabulary, view):
    pieces, results, clusters = swapped
    examples = results[view]
    assert len(examples) == NUM_EXAMPLES
    replaced_total = regular_total = 0
    substitutes = []
    for piece, example in zip(pieces, examples, strict=True):
        inputs, noised, labels = (
            example["inputs"],
            example["inputs_noised"],
            example["noise_labels"],
        )
        assert len(inputs) == len(noised) == len(labels)
        # The decoder keeps its span target: inputs and targets still restore the piece.
        np.testing.assert_array_equal(
            uncorrupt(inputs[:-1], example["targets"][:-1], vocabulary), piece
        )
        changed = inputs != noised
        np.testing.assert_array_equal(labels, changed.astype(np.int32))  # 1 exactly where swapped
        special = numpy_special(inputs, vocabulary)
        assert not changed[special].any()  # no special token ever substituted ...
        assert not numpy_special(noised[changed], vocabulary).any()  # ... nor a substitute
        replaced_total += int(changed.sum())
        regular_total += int((~special).sum())
        substitutes.append(np.stack([inputs[changed], noised[changed]], 1))
    rate = replaced_total / regular_total
    # Within 1% (relative) of the setting; the count's standard error here is about 0.1%.
    assert abs(rate - 0.15) < 0.01 * 0.15, rate
    pairs = np.concatenate(substitutes)
    if view == "c_rts":
        # Always the original's cluster, never the original, never from a singleton cluster.
        np.testing.assert_array_equal(clusters[pairs[:, 1]], clusters[pairs[:, 0]])
        assert not np.isin(pairs[:, 0], [3, 4]).any()
    else:
        # Uniform substitutes: the regular ids are drawn about equally often.
        regular = token_swaps.regular_id_mask(vocabulary)
        counts = np.bincount(pairs[:, 1], minlength=vocabulary.vocab_size)[regular]
        expected = len(pairs) / regular.sum()
        assert abs(counts.mean() - expected) < 1e-9
        assert counts.std() < 2 * np.sqrt(expected), (counts.std(), np.sqrt(expected))
    assert (pairs[:, 0] != pairs[:, 1]).all()


def test_slm_targets_are_the_originals_at_swapped_positions(swapped):
    from e2s2_jax.objectives import slm_targets

    _, results, _ = swapped
    inputs, noised, labels = (
        np.concatenate([example[key] for example in results["slm"]])
        for key in ("inputs", "inputs_noised", "noise_labels")
    )
    targets = np.asarray(slm_targets(inputs, labels, view_labels.SWAP_REPLACED))
    reference = np.where(inputs != noised, inputs, 0)  # 0: ignored by the loss
    np.testing.assert_array_equal(targets, reference)
    assert (targets != 0).sum() > 0.1 * len(targets)


def test_no_view_slot_and_seeding(vocabulary, corpus_tokens):
    pieces = documents(corpus_tokens, 30, seed=4)
    for example in view_examples(vocabulary, pieces, "none"):
        np.testing.assert_array_equal(example["inputs_noised"], example["inputs"])
        assert (example["noise_labels"] == view_labels.NO_SECOND_VIEW).all()  # eos included
    first = view_examples(vocabulary, pieces, "rts", seed=7)
    again = view_examples(vocabulary, pieces, "rts", seed=7)
    other = view_examples(vocabulary, pieces, "rts", seed=8)
    same = [
        np.array_equal(a["inputs_noised"], b["inputs_noised"])
        for a, b in zip(first, again, strict=True)
    ]
    differ = [
        np.array_equal(a["inputs_noised"], b["inputs_noised"])
        for a, b in zip(first, other, strict=True)
    ]
    assert all(same) and not all(differ)


def test_bad_settings_stop_with_a_message(vocabulary, tmp_path):
    features = pretraining_output_features(vocabulary, with_noised_view=True)
    add = functools.partial(encoder_views.add_encoder_view, None, features)
    for rate in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"swap_rate={rate}: .* must be in \(0, 1\)"):
            add(view="rts", swap_rate=rate)
    with pytest.raises(ConfigError, match="needs cluster_file"):
        add(view="c_rts")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros(vocabulary.vocab_size + 5, np.int32))
    with pytest.raises(ConfigError, match=r"shape \(1105,\) but the vocabulary has 1100 ids"):
        add(view="c_rts", cluster_file=str(wrong))
    with pytest.raises(ConfigError, match="does not exist"):
        add(view="c_rts", cluster_file=str(tmp_path / "missing.npy"))
    with pytest.raises(ConfigError, match="view='mlm' is not one of"):
        add(view="mlm")
