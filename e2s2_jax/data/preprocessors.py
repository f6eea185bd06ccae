"""The preprocessor chains that tasks use: document splitting and the pretraining objectives'
chain (tokenize, split, objective, eos) with its output features, and the reader of SSR
records. The objectives themselves are span_corruption.py's and e2s2_views.py's."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import seqio
import tensorflow as tf

from e2s2_jax.data.e2s2_views import NOISE_LABELS_VOCABULARY, e2s2_views
from e2s2_jax.data.encoder_views import add_encoder_view
from e2s2_jax.data.same_document import PAIR_LABELS_FEATURE, without_pair
from e2s2_jax.data.span_corruption import (
    FULL_RECONSTRUCTION,
    SPAN_TARGETS,
    check_sentinels_available,
    max_document_tokens,
    noise_token_and_span_counts,
    span_corruption,
)


# ---------------------------------------------------------------------------------------------
# Document splitting.
# ---------------------------------------------------------------------------------------------
def split_documents(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    output_features: Mapping[str, seqio.Feature] | None = None,
    *,
    feature_key: str = "targets",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
    max_tokens: int | None = None,
    documents_per_group: int | None = None,
) -> tf.data.Dataset:
    """Splits tokenized documents into pieces that fit the objective's lengths; drops nothing.

    documents_per_group=None: a document of L tokens becomes ceil(L / max_tokens) near-equal
    pieces. documents_per_group=k: k consecutive documents are concatenated (T5's recipe, no
    separator) and cut into max_tokens pieces, the group's remainder a shorter last piece, so
    examples come out full. `max_tokens` defaults to `max_document_tokens` of the Task's
    sequence lengths (SeqIO passes `sequence_length`), or 568 when none is known. Empty
    documents are removed; other features are dropped.
    Returns a dataset of {feature_key: int32 [piece_length]}.
    """
    if max_tokens is None:
        sequence_length = sequence_length or {}
        max_tokens = max_document_tokens(
            sequence_length.get("inputs"),
            sequence_length.get("targets"),
            noise_density,
            mean_noise_span_length,
            target_mode,
        )
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
    if output_features and feature_key in output_features:
        _, max_spans = noise_token_and_span_counts(
            max_tokens, noise_density, mean_noise_span_length
        )
        check_sentinels_available(output_features[feature_key].vocabulary, max_spans)

    def split_into_pieces(features):
        tokens = tf.cast(features[feature_key], tf.int32)
        length = tf.size(tokens)
        num_pieces = tf.maximum((length + max_tokens - 1) // max_tokens, 1)
        # Piece i gets floor(L/k) tokens plus one for the first L mod k pieces.
        base, remainder = length // num_pieces, length % num_pieces
        piece_lengths = base + tf.cast(tf.range(num_pieces) < remainder, tf.int32)
        return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, piece_lengths)}

    def cut_group_into_pieces(features):
        tokens = features[feature_key].flat_values
        length = tf.size(tokens)
        num_full = length // max_tokens
        remainder = length - num_full * max_tokens
        piece_lengths = tf.concat(
            [
                tf.fill([num_full], max_tokens),
                tf.reshape(remainder, [1])[: tf.minimum(remainder, 1)],
            ],
            axis=0,
        )
        return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, piece_lengths)}

    dataset = dataset.map(
        lambda features: {feature_key: tf.cast(features[feature_key], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.filter(lambda features: tf.size(features[feature_key]) > 0)
    if documents_per_group is None:
        return dataset.map(split_into_pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    if documents_per_group < 1:
        raise ValueError(
            f"documents_per_group must be positive or None, got {documents_per_group}."
        )
    dataset = dataset.ragged_batch(documents_per_group)
    return dataset.map(cut_group_into_pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# ---------------------------------------------------------------------------------------------
# Output features and the shared chain.
# ---------------------------------------------------------------------------------------------
def pretraining_output_features(
    vocabulary: seqio.Vocabulary, with_noised_view: bool = False, with_pair_labels: bool = False
) -> dict[str, seqio.Feature]:
    """Returns the Task output features: inputs/targets, plus E2S2's view N and labels, plus
    the same-document task's pair labels."""
    features = {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }
    if with_noised_view:
        features["inputs_noised"] = seqio.Feature(vocabulary=vocabulary, add_eos=True)
        features["noise_labels"] = seqio.Feature(vocabulary=NOISE_LABELS_VOCABULARY, add_eos=True)
    if with_pair_labels:
        features["pair_labels"] = PAIR_LABELS_FEATURE
    return features


# objective -> (preprocessor, target mode, encoder view added after the eos or None).
OBJECTIVES = {
    "span_corruption": (span_corruption, SPAN_TARGETS, None),
    "full_reconstruction": (span_corruption, FULL_RECONSTRUCTION, None),
    "e2s2": (e2s2_views, SPAN_TARGETS, None),
    "e2s2_full_reconstruction": (e2s2_views, FULL_RECONSTRUCTION, None),
    # RTS / C-RTS / SLM: span corruption, then the swapped view of its inputs (encoder_views).
    "rts": (span_corruption, SPAN_TARGETS, "rts"),
    "c_rts": (span_corruption, SPAN_TARGETS, "c_rts"),
    "slm": (span_corruption, SPAN_TARGETS, "slm"),
    # Span corruption with an empty second-view slot: mixes with the objectives above.
    "span_corruption_no_view": (span_corruption, SPAN_TARGETS, "none"),
    # Span corruption with pair labels NO_PAIR: mixes with the same-document task.
    "span_corruption_no_pair": (span_corruption, SPAN_TARGETS, None),
}
# The objectives whose examples carry pair_labels (all NO_PAIR), added after the eos.
OBJECTIVES_WITH_PAIR_LABELS = ("span_corruption_no_pair",)
# The objectives that need options beyond the defaults (C-RTS: its cluster file), which the
# bundled and C4 registrations therefore leave out (tasks/encoder_views.py registers them).
OBJECTIVES_WITH_REQUIRED_OPTIONS = ("c_rts",)
# Options of the swap views, handed to `add_encoder_view` rather than to the preprocessor.
VIEW_OPTIONS = ("swap_rate", "cluster_file")


def objective_has_noised_view(objective: str) -> bool:
    """Returns True for the objectives whose examples carry inputs_noised and noise_labels."""
    return objective in OBJECTIVES and (
        OBJECTIVES[objective][0] is e2s2_views or OBJECTIVES[objective][2] is not None
    )


def pretraining_preprocessors(
    objective: str,
    *,
    text_key: str = "text",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    documents_per_group: int | None = 128,
    **objective_options,
) -> list:
    """Returns the Task preprocessors: rekey text -> tokenize -> split -> objective -> eos.

    objective: one of OBJECTIVES ('span_corruption', 'full_reconstruction', 'e2s2',
    'e2s2_full_reconstruction', 'rts', 'c_rts', 'slm', 'span_corruption_no_view',
    'span_corruption_no_pair').
    documents_per_group: see split_documents (128 concatenates
    documents as T5 does, so examples are full; None keeps documents apart for packing).
    Extra keyword options go to the objective's preprocessor (e2s2: shuffle/replace ratios),
    swap_rate and cluster_file to its view (rts / slm: swap_rate; c_rts: both).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {sorted(OBJECTIVES)}.")
    objective_fn, target_mode, view = OBJECTIVES[objective]
    noise_options = dict(
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        target_mode=target_mode,
    )
    view_options = {k: objective_options.pop(k) for k in VIEW_OPTIONS if k in objective_options}
    if view_options and view is None:
        raise ValueError(f"objective={objective!r} takes no {sorted(view_options)}.")
    chain = [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        seqio.preprocessors.tokenize,
        functools.partial(
            split_documents, documents_per_group=documents_per_group, **noise_options
        ),
        functools.partial(objective_fn, **noise_options, **objective_options),
        seqio.preprocessors.append_eos_after_trim,
    ]
    if view is not None:
        chain.append(functools.partial(add_encoder_view, view=view, **view_options))
    if objective in OBJECTIVES_WITH_PAIR_LABELS:
        chain.append(without_pair)
    return chain


# ---------------------------------------------------------------------------------------------
# SSR records.
# ---------------------------------------------------------------------------------------------
SSR_FEATURE_DESCRIPTION = {
    "inputs": tf.io.FixedLenFeature([], tf.string),
    "targets": tf.io.FixedLenFeature([], tf.string),
    "fill_score": tf.io.FixedLenFeature([], tf.float32),
}


def ssr_task_source(
    split_to_filepattern: Mapping[str, str | Iterable[str]],
    num_input_examples: Mapping[str, int] | None = None,
) -> seqio.TFExampleDataSource:
    """Returns a source over SSR TFRecords of tf.train.Example with string `inputs`, `targets`
    (sentinel-marked text, exact around the spans: a sentinel may be glued to the previous word,
    so tokenize them with `ssr_preprocessors`) and float `fill_score` (the generator's mean fill
    log-probability).
    """
    return seqio.TFExampleDataSource(
        split_to_filepattern=dict(split_to_filepattern),
        feature_description=SSR_FEATURE_DESCRIPTION,
        num_input_examples=num_input_examples,
    )


# A sentinel right after a non-space character, as in the record of a span that starts right
# after a word (`dog.` with `.` masked gives `dog<extra_id_0> FILL <extra_id_1>`). Only the
# sentinel's head is matched, so a sentinel right after another one is matched too.
_GLUED_SENTINEL = r"(\S)(<extra_id_\d)"


@seqio.map_over_dataset
def space_glued_sentinels(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Returns the SSR record with a space before every sentinel glued to the previous word in
    `inputs` and `targets`, the rest of the text unchanged. SentencePiece knows sentinel k only
    as the piece `▁<extra_id_k>`, so `dog<extra_id_0>` would tokenize into ordinary pieces."""
    spaced = {
        key: tf.strings.regex_replace(features[key], _GLUED_SENTINEL, r"\1 \2")
        for key in ("inputs", "targets")
    }
    return {**features, **spaced}


def ssr_preprocessors() -> list:
    """Returns the Task preprocessors for SSR records: space glued sentinels (so each becomes
    its id), tokenize, then append eos."""
    return [
        space_glued_sentinels,
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
    ]
