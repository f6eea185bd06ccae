"""Encoder-decoder feature converter (SeqIO) that packs E2S2's second view and noise labels, and
the same-document task's pair labels, aligned with the encoder inputs, and self-evolution's
uncorrupted inputs, in step with them; and a packing-efficiency measure for benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import seqio
import tensorflow as tf

from e2s2_jax.data.view_labels import LABEL_BASE, NO_PAIR

FeatureSpec = seqio.FeatureConverter.FeatureSpec

NOISED_VIEW_TASK_FEATURES = ("inputs_noised", "noise_labels")
NOISED_VIEW_MODEL_FEATURES = ("encoder_input_tokens_noised", "encoder_noise_labels")
_COMBINED_VIEW = "inputs_noised_and_labels"
PAIR_LABELS_TASK_FEATURE = "pair_labels"
PAIR_LABELS_MODEL_FEATURE = "encoder_pair_labels"
# Self-evolution learning's reference input: the example's text before corruption (its own
# length; with packing its own segment ids, numbered as the inputs' are).
REFERENCE_TASK_FEATURE = "reference_inputs"
REFERENCE_MODEL_FEATURE = "reference_encoder_input_tokens"
REFERENCE_SEGMENT_IDS = "reference_encoder_segment_ids"


def reference_length(task_feature_lengths: Mapping[str, int]) -> int:
    """The reference input's length: as given, else inputs + targets (enough for the source of
    any span corruption of those lengths)."""
    return task_feature_lengths.get(
        REFERENCE_TASK_FEATURE, task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    )


def _feature_switch(setting: bool | None, option: str, feature: str, present, task: str) -> bool:
    """Whether the converter carries the optional task `feature`: `setting` (its `option`), or
    None to follow the dataset (`present`: its features); True on a dataset without it stops
    with the fix."""
    if setting is None:
        return feature in present
    if setting and feature not in present:
        raise ValueError(
            f"{option}=True but the dataset has no '{feature}': use {task} or {option}=False."
        )
    return bool(setting)


class E2S2EncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio.EncDecFeatureConverter plus E2S2's view N, packed in step with the inputs.

    Model features (all int32 [length]): encoder_input_tokens, decoder_input_tokens (targets
    shifted right, 0 first, restarting in each packed segment), decoder_target_tokens,
    decoder_loss_weights; with packing also encoder/decoder_segment_ids and _positions; and,
    when the task has `inputs_noised`, encoder_input_tokens_noised and encoder_noise_labels
    (pad positions get label 0; mask them with encoder_segment_ids or the tokens).

    `with_noised_view`: True / False, or None (default) to follow the dataset. The lengths of
    inputs_noised and noise_labels default to that of inputs (they must be equal).

    `with_pair_labels` (the same-document task and what mixes with it): likewise for the task's
    `pair_labels`, which becomes encoder_pair_labels (view_labels' pair classes; NO_PAIR at
    padding and in rows without a pair).

    `with_reference_inputs` (the self-evolution task): likewise for the task's
    `reference_inputs` (the uncorrupted text), which becomes reference_encoder_input_tokens,
    and with packing reference_encoder_segment_ids, segment k of a row being the same example
    as the inputs' segment k. Its length defaults to inputs + targets, which holds any span
    corruption's source (a corrupted example keeps every source token in one of the two, plus
    its sentinels and the two eos).
    """

    def __init__(
        self,
        *args,
        with_noised_view: bool | None = None,
        with_pair_labels: bool | None = None,
        with_reference_inputs: bool | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._with_noised_view = with_noised_view
        self._with_pair_labels = with_pair_labels
        self._with_reference_inputs = with_reference_inputs
        self._set_features(
            bool(with_noised_view), bool(with_pair_labels), bool(with_reference_inputs)
        )

    def _set_features(self, noised_view: bool, pair_labels: bool, reference: bool) -> None:
        task_features = dict(seqio.EncDecFeatureConverter.TASK_FEATURES)
        model_features = dict(seqio.EncDecFeatureConverter.MODEL_FEATURES)
        task_names, model_names = [], []
        if noised_view:
            task_names += NOISED_VIEW_TASK_FEATURES
            model_names += NOISED_VIEW_MODEL_FEATURES
        if pair_labels:
            task_names.append(PAIR_LABELS_TASK_FEATURE)
            model_names.append(PAIR_LABELS_MODEL_FEATURE)
        if reference:
            task_names.append(REFERENCE_TASK_FEATURE)
            model_names.append(REFERENCE_MODEL_FEATURE)
            if self.pack:
                model_names.append(REFERENCE_SEGMENT_IDS)
        task_features.update({k: FeatureSpec(dtype=tf.int32) for k in task_names})
        model_features.update({k: FeatureSpec(dtype=tf.int32) for k in model_names})
        self.TASK_FEATURES = task_features
        self.MODEL_FEATURES = model_features
        self._noised_view_enabled = noised_view
        self._pair_labels_enabled = pair_labels
        self._reference_enabled = reference

    def __call__(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        present = ds.element_spec
        enabled = _feature_switch(
            self._with_noised_view,
            "with_noised_view",
            "inputs_noised",
            present,
            "an E2S2 task (e2s2_views)",
        )
        pairs = _feature_switch(
            self._with_pair_labels,
            "with_pair_labels",
            PAIR_LABELS_TASK_FEATURE,
            present,
            "a same-document task (or a mixture with one)",
        )
        reference = _feature_switch(
            self._with_reference_inputs,
            "with_reference_inputs",
            REFERENCE_TASK_FEATURE,
            present,
            "the self-evolution task (self_evolution_task)",
        )
        self._set_features(enabled, pairs, reference)
        return super().__call__(ds, self._complete_lengths(task_feature_lengths))

    def _complete_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = dict(task_feature_lengths)
        for keys, enabled in (
            (NOISED_VIEW_TASK_FEATURES, self._noised_view_enabled),
            ((PAIR_LABELS_TASK_FEATURE,), self._pair_labels_enabled),
        ):
            for key in keys:
                if not enabled:
                    lengths.pop(key, None)
                    continue
                lengths.setdefault(key, lengths["inputs"])
                if lengths[key] != lengths["inputs"]:
                    raise ValueError(
                        f"task_feature_lengths[{key!r}]={lengths[key]} must equal "
                        f"task_feature_lengths['inputs']={lengths['inputs']}: the views align."
                    )
        if self._reference_enabled:
            lengths[REFERENCE_TASK_FEATURE] = reference_length(lengths)
        else:
            lengths.pop(REFERENCE_TASK_FEATURE, None)
        return lengths

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        noised_view, pair_labels = self._noised_view_enabled, self._pair_labels_enabled
        reference = self._reference_enabled
        if not (noised_view or pair_labels or reference):
            return super()._convert_features(ds, task_feature_lengths)

        # SeqIO's packing finds a sequence's length by counting non-zero entries, and label 0
        # ("untouched", "same paragraph") is common. View N's tokens and labels travel as one
        # packed feature, token * LABEL_BASE + label + 1 (never 0 on a real position, 0 on
        # padding), which also keeps the packing loop to three features instead of four; the
        # pair labels travel as label + 1.
        def encode(features):
            features = dict(features)
            if noised_view:
                features[_COMBINED_VIEW] = (
                    features.pop("inputs_noised") * LABEL_BASE + features.pop("noise_labels") + 1
                )
            if pair_labels:
                features[PAIR_LABELS_TASK_FEATURE] += 1
            return features

        lengths = dict(task_feature_lengths)
        if noised_view:
            lengths[_COMBINED_VIEW] = lengths.pop("inputs_noised")
            lengths.pop("noise_labels")
        ds = ds.map(encode, num_parallel_calls=tf.data.AUTOTUNE)
        ds = self._pack_or_pad(ds, lengths)

        def convert(features):
            model_features = self._convert_example(features)
            if noised_view:
                combined = features[_COMBINED_VIEW]
                model_features["encoder_input_tokens_noised"] = combined // LABEL_BASE
                model_features["encoder_noise_labels"] = tf.maximum(combined % LABEL_BASE - 1, 0)
            if pair_labels:
                packed = features[PAIR_LABELS_TASK_FEATURE]
                model_features[PAIR_LABELS_MODEL_FEATURE] = tf.where(
                    packed > 0, packed - 1, NO_PAIR
                )
            if reference:
                model_features[REFERENCE_MODEL_FEATURE] = features[REFERENCE_TASK_FEATURE]
                if self.pack:
                    model_features[REFERENCE_SEGMENT_IDS] = features[
                        f"{REFERENCE_TASK_FEATURE}_segment_ids"
                    ]
            return model_features

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        # Callers that ask for shapes before converting a dataset (a trainer building its input
        # specs) get the second view when they name it or construct with with_noised_view=True.
        if self._noised_view_enabled or "inputs_noised" in task_feature_lengths:
            for key in NOISED_VIEW_MODEL_FEATURES:
                lengths[key] = task_feature_lengths["inputs"]
        if self._pair_labels_enabled or PAIR_LABELS_TASK_FEATURE in task_feature_lengths:
            lengths[PAIR_LABELS_MODEL_FEATURE] = task_feature_lengths["inputs"]
        if self._reference_enabled or REFERENCE_TASK_FEATURE in task_feature_lengths:
            length = reference_length(task_feature_lengths)
            lengths[REFERENCE_MODEL_FEATURE] = length
            if self.pack:
                lengths[REFERENCE_SEGMENT_IDS] = length
        return lengths


def packing_efficiency(
    batches_or_dataset: tf.data.Dataset | Iterable[Mapping[str, np.ndarray]],
    max_batches: int | None = None,
) -> dict[str, float]:
    """Returns the share of non-pad positions: {'encoder', 'decoder', 'rows', 'examples_per_row'}.

    Takes converted model features (a tf.data.Dataset or an iterable of numpy dicts, batched or
    not). Non-pad means encoder_input_tokens != 0 / decoder_target_tokens != 0.
    'examples_per_row' counts packed segments per row when segment ids are present.
    """
    if isinstance(batches_or_dataset, tf.data.Dataset):
        batches_or_dataset = batches_or_dataset.as_numpy_iterator()
    counts = dict(encoder_tokens=0, encoder_slots=0, decoder_tokens=0, decoder_slots=0)
    rows = segments = 0
    for index, batch in enumerate(batches_or_dataset):
        if max_batches is not None and index >= max_batches:
            break
        encoder = np.asarray(batch["encoder_input_tokens"])
        decoder = np.asarray(batch["decoder_target_tokens"])
        encoder_2d = encoder.reshape(-1, encoder.shape[-1])
        counts["encoder_tokens"] += int(np.count_nonzero(encoder))
        counts["encoder_slots"] += encoder.size
        counts["decoder_tokens"] += int(np.count_nonzero(decoder))
        counts["decoder_slots"] += decoder.size
        rows += encoder_2d.shape[0]
        if "encoder_segment_ids" in batch:
            segment_ids = np.asarray(batch["encoder_segment_ids"]).reshape(encoder_2d.shape)
            segments += int(segment_ids.max(axis=-1).sum())
        else:
            segments += int(np.any(encoder_2d != 0, axis=-1).sum())
    if rows == 0:
        raise ValueError("packing_efficiency got no batches: the dataset is empty.")
    return {
        "encoder": counts["encoder_tokens"] / counts["encoder_slots"],
        "decoder": counts["decoder_tokens"] / counts["decoder_slots"],
        "rows": rows,
        "examples_per_row": segments / rows,
    }
