"""Tests of E2S2's two views: noise fractions, labels against a token diff, configurable
ratios, and seeding."""

import numpy as np
import seqio
from preprocessor_helpers import is_sentinel, run, uncorrupt

from e2s2_jax.data import e2s2_views
from e2s2_jax.data.preprocessors import pretraining_output_features


def e2s2_examples(vocabulary, corpus_tokens, num_examples=300, seed=0, **options):
    pieces = [corpus_tokens[i * 568 : (i + 1) * 568] for i in range(num_examples)]
    features = pretraining_output_features(vocabulary, with_noised_view=True)

    def preprocess(dataset, output_features):
        dataset = e2s2_views.e2s2_views(dataset, output_features, **options)
        return seqio.preprocessors.append_eos_after_trim(dataset, output_features)

    return pieces, run(preprocess, pieces, features, seed=seed)


def test_e2s2_views_noise_fractions_and_labels(vocabulary, corpus_tokens):
    pieces, outputs = e2s2_examples(vocabulary, corpus_tokens)
    shuffled = replaced = positions = 0
    for piece, example in zip(pieces, outputs, strict=True):
        view_m, view_n = example["inputs"], example["inputs_noised"]
        labels = example["noise_labels"]
        assert len(view_m) == len(view_n) == len(labels) == 512  # eos included
        np.testing.assert_array_equal(
            uncorrupt(view_m[:-1], example["targets"][:-1], vocabulary), piece
        )
        changed = view_m != view_n
        # Labels agree with a token-by-token diff of the two views.
        np.testing.assert_array_equal(changed, labels > 0)
        # A shuffled token comes from its own trigram: within two positions in view M.
        for i in np.flatnonzero(labels == 1):
            assert view_n[i] in view_m[max(i - 2, 0) : i + 3]
        # Special tokens (sentinels, eos, unk, pad) stay where they are and are never written.
        special = is_sentinel(view_m, vocabulary) | np.isin(view_m, [0, 1, 2])
        np.testing.assert_array_equal(view_n[special], view_m[special])
        assert not np.isin(view_n[~special], [0, 1, 2]).any()
        assert not is_sentinel(view_n[~special], vocabulary).any()
        assert labels[-1] == 0 and view_n[-1] == 1
        shuffled += int((labels == 1).sum())
        replaced += int((labels == 2).sum())
        positions += len(labels)
    assert 0.05 <= shuffled / positions <= 0.10, shuffled / positions
    assert 0.12 <= replaced / positions <= 0.16, replaced / positions


def test_e2s2_views_ratios_are_configurable(vocabulary, corpus_tokens):
    _, outputs = e2s2_examples(
        vocabulary,
        corpus_tokens,
        num_examples=50,
        replace_ratio=0.0,
        shuffle_anchor_ratio=0.0,
        max_shuffle_anchors=0,
    )
    for example in outputs:
        np.testing.assert_array_equal(example["inputs"], example["inputs_noised"])
        assert not example["noise_labels"].any()
    _, outputs = e2s2_examples(vocabulary, corpus_tokens, num_examples=50, replace_ratio=0.3)
    replaced = np.mean(np.concatenate([ex["noise_labels"] for ex in outputs]) == 2)
    assert 0.24 < replaced < 0.30


def test_same_seed_same_bytes_other_seed_differs(vocabulary, corpus_tokens):
    _, first = e2s2_examples(vocabulary, corpus_tokens, num_examples=20, seed=7)
    _, again = e2s2_examples(vocabulary, corpus_tokens, num_examples=20, seed=7)
    _, other = e2s2_examples(vocabulary, corpus_tokens, num_examples=20, seed=8)
    for key in ("inputs", "inputs_noised", "noise_labels", "targets"):
        assert b"".join(ex[key].tobytes() for ex in first) == b"".join(
            ex[key].tobytes() for ex in again
        )
    assert any(
        not np.array_equal(a["inputs_noised"], b["inputs_noised"])
        for a, b in zip(first, other, strict=True)
    )
