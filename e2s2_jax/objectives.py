"""Training objectives: what the train step differentiates.

An objective is a small object with two methods:

- `normalizers(batch) -> {name: scalar}`: the denominators of its loss terms (numbers of target
  tokens, of examples, ...), functions of the *whole* global batch only, never of the params.
- `__call__(model, params, batch, normalizers, dropout_rng) -> (loss, metrics)`: the loss of a
  (micro)batch, with every term already divided by its *global* normalizer, and metrics that are
  likewise additive contributions. With `attention_entropy=True` (the train step's entropy
  variant) the metrics also carry the attention-entropy sums and counts of the rows the model
  ran on (`apply_seq2seq`), which the train step turns into means.

Because each microbatch's loss is its share of the full-batch loss, summing losses, gradients and
metrics over microbatches gives exactly the full-batch values, for any objective (see
`training/train_step.py`). Normalizers are reported as metrics as they are.

`Seq2SeqObjective` is T5's: token cross-entropy on the decoder (span corruption, prefix LM,
full reconstruction, fine-tuning all use it). `E2S2Objective` adds an encoder-side second view
and the terms on it: E2S2's denoising and contrastive terms (METHODS.md section 1), RTS / C-RTS's
replaced-token detection (the same per-position classifier with two classes), SLM's
prediction of the original tokens at swapped positions (METHODS.md section 4) and the
same-document task's 3-way pair classification on the mean-pooled encoder output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2s2_jax import losses
from e2s2_jax.data import view_labels
from e2s2_jax.errors import ConfigError
from e2s2_jax.models import fusion, heads
from e2s2_jax.models.attention_entropy import ENTROPY_COLLECTION, entropy_terms

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class Objective(Protocol):
    def normalizers(self, batch: Batch) -> Metrics: ...

    def __call__(
        self,
        model: nn.Module,
        params: PyTree,
        batch: Batch,
        normalizers: Metrics,
        dropout_rng: jax.Array | None,
        *,
        attention_entropy: bool = False,
    ) -> tuple[jax.Array, Metrics]: ...


def safe_denominator(x: jax.Array) -> jax.Array:
    """`x` where positive, else 1 (an empty batch contributes 0, not NaN)."""
    return jnp.where(x > 0, x, 1.0).astype(jnp.float32)


def apply_seq2seq(
    model: nn.Module,
    params: PyTree,
    batch: Batch,
    dropout_rng: jax.Array | None,
    *,
    input_feature: str = "encoder_input_tokens",
    return_intermediates: bool = False,
    attention_entropy: bool = False,
) -> tuple[Any, Metrics]:
    """`(outputs, entropy_terms)`: the model on a batch's encoder input (`input_feature`) and
    decoder features, dropout running when `dropout_rng` is given; with `attention_entropy`,
    the attention-entropy sums and counts of every layer over these rows' non-pad queries
    (`models/attention_entropy.entropy_terms`), else `{}`."""
    outputs = model.apply(
        {"params": params},
        batch[input_feature],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"),
        enable_dropout=dropout_rng is not None,
        return_intermediates=return_intermediates,
        rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
        mutable=[ENTROPY_COLLECTION] if attention_entropy else False,
    )
    if not attention_entropy:
        return outputs, {}
    outputs, sown = outputs
    pad_id = model.config.pad_id
    terms = entropy_terms(
        sown[ENTROPY_COLLECTION],
        batch[input_feature] != pad_id,
        batch["decoder_target_tokens"] != pad_id,
    )
    return outputs, terms


def target_weights(batch: Batch) -> jax.Array:
    """`decoder_loss_weights`, or 1 at every non-pad target when the batch has none."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] != 0).astype(jnp.float32)


def decoder_nll(
    model: nn.Module,
    outputs: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float,
    label_smoothing: float,
    rectified_label_smoothing: float = 0.0,
    reference_logits: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(loss_sum, z_loss_sum, weight_sum)` of the decoder's outputs against `targets`.

    Logits (any plain model, SurfaceFusion "soft"/"postnorm", or "hard"/"gate" with
    `SurfaceFusion.renormalize = True`): t5x's cross-entropy with z-loss and label smoothing
    (`losses.cross_entropy_with_logits`). SurfaceFusion "hard"/"gate" scores
    (`fusion.scores_used_as_is`): minus the score at the target, as is, with fairseq's label
    smoothing and no z-loss (`losses.label_smoothed_nll`; METHODS.md section 3). With
    `rectified_label_smoothing` > 0, smoothing towards the detached prediction
    `reference_logits` instead (`losses.rectified_cross_entropy_with_logits`).
    """
    if rectified_label_smoothing:
        return losses.rectified_cross_entropy_with_logits(
            outputs,
            targets,
            weights,
            rectified_label_smoothing=rectified_label_smoothing,
            z_loss=z_loss,
            reference_logits=reference_logits,
        )
    if fusion.scores_used_as_is(model):
        return losses.label_smoothed_nll(outputs, targets, weights, label_smoothing=label_smoothing)
    return losses.cross_entropy_with_logits(
        outputs, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing
    )


# The self-evolution task's uncorrupted inputs (`E2S2EncDecFeatureConverter`'s reference feature).
REFERENCE_TOKENS = "reference_encoder_input_tokens"
REFERENCE_SEGMENT_IDS = "reference_encoder_segment_ids"


def reference_logits(model: nn.Module, params: PyTree, batch: Batch) -> jax.Array:
    """Rectified label smoothing's reference prediction, detached: the model without dropout on
    the example's text before corruption (`reference_encoder_input_tokens`, from the
    self-evolution task) with the batch's decoder inputs. This is the authors' reference pass
    (SE4PLMs, `fairseq-self_evolution/criterions/cross_entropy.py`: `model.eval()` under
    `torch.no_grad()` on `net_input_ref`, which `data/mask_tokens_dataset.py` fills with the
    unmasked sentence), moved to the encoder-decoder: every target token is visible in the
    reference input, as the masked token is in RoBERTa's."""
    if REFERENCE_TOKENS not in batch:
        raise ConfigError(
            "Seq2SeqObjective.rectified_label_smoothing > 0 needs the uncorrupted inputs "
            f"('{REFERENCE_TOKENS}') in the batch: train on "
            "self_evolution_task (gin/objectives/self_evolution.gin), or set it to 0."
        )
    reference_batch = {
        "encoder_input_tokens": batch[REFERENCE_TOKENS],
        "decoder_input_tokens": batch["decoder_input_tokens"],
        "decoder_target_tokens": batch["decoder_target_tokens"],
    }
    if "decoder_segment_ids" in batch:
        reference_batch["decoder_segment_ids"] = batch["decoder_segment_ids"]
        reference_batch["encoder_segment_ids"] = batch[REFERENCE_SEGMENT_IDS]
    logits, _ = apply_seq2seq(model, params, reference_batch, None)
    return jax.lax.stop_gradient(logits)


@dataclasses.dataclass(frozen=True)
class Seq2SeqObjective:
    """Decoder cross-entropy per weighted target token, with t5x's z-loss and label smoothing.

    With a SurfaceFusion "hard" or "gate" output layer (unless `SurfaceFusion.renormalize`), the
    reference's loss instead: minus the fused score at the target, used as is, with fairseq's
    label smoothing and no z-loss (`decoder_nll`); `cross_entropy` then reports that NLL.

    `rectified_label_smoothing` (self-evolution learning; off at 0): smooth towards the model's
    own detached prediction on the uncorrupted text (`reference_logits`, one more forward pass
    without dropout) instead of the uniform distribution
    (`losses.rectified_cross_entropy_with_logits`; `gin/objectives/self_evolution.gin`).

    Metrics: `loss` (cross-entropy + z-loss, the optimised value), `cross_entropy`, `z_loss`,
    `weight_sum` (target tokens in the global batch).
    """

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    rectified_label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.rectified_label_smoothing < 1.0:
            raise ConfigError(
                f"Seq2SeqObjective.rectified_label_smoothing={self.rectified_label_smoothing}: "
                "use a value in [0, 1) (0 turns it off; self_evolution.gin uses 0.1)."
            )
        if self.rectified_label_smoothing and self.label_smoothing:
            raise ConfigError(
                "Seq2SeqObjective.label_smoothing and rectified_label_smoothing are both set: "
                "they are two targets for the same smoothing mass; set one of them to 0."
            )

    def normalizers(self, batch: Batch) -> Metrics:
        return {"weight_sum": jnp.sum(target_weights(batch))}

    def __call__(self, model, params, batch, normalizers, dropout_rng, *, attention_entropy=False):
        logits, entropy = apply_seq2seq(
            model, params, batch, dropout_rng, attention_entropy=attention_entropy
        )
        loss_sum, z_sum, _ = decoder_nll(
            model,
            logits,
            batch["decoder_target_tokens"],
            target_weights(batch),
            z_loss=self.z_loss,
            label_smoothing=self.label_smoothing,
            rectified_label_smoothing=self.rectified_label_smoothing,
            reference_logits=(
                reference_logits(model, params, batch) if self.rectified_label_smoothing else None
            ),
        )
        denominator = safe_denominator(normalizers["weight_sum"])
        loss = loss_sum / denominator
        z_term = z_sum / denominator
        metrics = {"loss": loss, "cross_entropy": loss - z_term, "z_loss": z_term}
        return loss, {**metrics, **entropy}


# View N's features, made by `E2S2EncDecFeatureConverter(with_noised_view=True)` from a task
# with a second view (E2S2, RTS, C-RTS, SLM); view M is `encoder_input_tokens` (the inputs).
NOISED_TOKENS = "encoder_input_tokens_noised"
NOISE_LABELS = "encoder_noise_labels"
MASKED_TOKENS = "encoder_input_tokens"
# The same-document task's pair label at each input position (view_labels: 0, 1, 2, NO_PAIR).
PAIR_LABELS = "encoder_pair_labels"


def view_positions(batch: Batch) -> jax.Array:
    """bool `[batch, length]`: view N's non-pad positions of examples that have a second view
    (an example without one is labelled `view_labels.NO_SECOND_VIEW` and adds no encoder term)."""
    return (batch[NOISED_TOKENS] != 0) & (batch[NOISE_LABELS] != view_labels.NO_SECOND_VIEW)


def slm_targets(
    masked_tokens: jax.Array, noise_labels: jax.Array, replaced_label: int
) -> jax.Array:
    """SLM's encoder targets `[batch, length]`: the original token (view M's) where view N's label
    is `replaced_label`, 0 (ignored) elsewhere. View N is aligned with view M and a replaced
    position is never moved, so view M holds the original there; originals are never pad."""
    return jnp.where(noise_labels == replaced_label, masked_tokens, 0)


def first_positions(selected: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """`(positions [batch, count] int32, valid [batch, count] bool)`: the first `count` true
    positions of each row of `selected` `[batch, length]`, in order (padded with invalid 0s)."""
    length = selected.shape[-1]
    keys = jnp.where(selected, length - jnp.arange(length), 0)
    top, positions = jax.lax.top_k(keys, count)
    valid = top > 0
    return jnp.where(valid, positions, 0).astype(jnp.int32), valid


def mode_count(values: jax.Array, weights: jax.Array) -> jax.Array:
    """float32 count of the commonest of `values` (ints >= 0) where `weights` is nonzero."""
    flat = jnp.where(weights != 0, values, -1).reshape(-1)
    ordered = jnp.sort(flat)
    counts = jnp.searchsorted(ordered, ordered, side="right") - jnp.searchsorted(
        ordered, ordered, side="left"
    )
    return jnp.max(jnp.where(ordered >= 0, counts, 0)).astype(jnp.float32)


def classifier_metrics(
    name: str,
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    share: jax.Array,
    normalizers: Metrics,
    metrics: Metrics,
) -> None:
    """Writes `name`'s `_loss`, `_accuracy` (over the weighted items, divided by the global
    `name_weight_sum`) and `_majority_rate`: the global batch's rate of its commonest label
    (`name_majority_count`), as the share of this microbatch's `share` items."""
    denominator = safe_denominator(normalizers[f"{name}_weight_sum"])
    loss_sum, _, _ = losses.cross_entropy_with_logits(logits, labels, weights)
    metrics[f"{name}_loss"] = loss_sum / denominator
    metrics[f"{name}_accuracy"] = (
        losses.classification_accuracy_sum(logits, labels, weights) / denominator
    )
    metrics[f"{name}_majority_rate"] = (share / denominator) * (
        normalizers[f"{name}_majority_count"] / denominator
    )


@dataclasses.dataclass(frozen=True)
class E2S2Objective:
    """The decoder loss with encoder-side terms on a second view of the inputs, each weighted:
    `nll_noised_weight * NLL(view N) + nll_masked_weight * NLL(view M) + denoise_weight *
    L_denoise + contrast_weight * L_contrast + slm_weight * L_slm + same_document_weight *
    L_same_document` (METHODS.md sections 1, 4).

    E2S2: view N is the trigram-shuffled, replaced view and `L_denoise` its 3-way noise labels.
    RTS / C-RTS: view N is the swapped view, `L_denoise` its 2-way original/replaced labels
    (`DenoisingHead.num_classes = 2`, the head named e.g. "rts"). SLM: `L_slm` on the swapped
    view. Examples without a second view (labelled `view_labels.NO_SECOND_VIEW`, e.g. span
    corruption in a mixture with E2S2) count in the NLL terms only. Same-document: view M is
    the pair `span eos span` and `L_same_document` its pair label; examples without a pair
    (`view_labels.NO_PAIR`) count in the NLL terms only.

    Both views run as one batch of 2B rows through encoder and decoder (rows interleaved, N_0,
    M_0, N_1, M_1, ..., so that each device's rows of both views stay on that device), then
    split. With `nll_masked_weight` and `contrast_weight` both 0, view M is not computed (one
    pass over view N). A term whose weight is 0 is not computed.

    - NLL: decoder cross-entropy per weighted target token (both views share the targets), with
      t5x's z-loss and label smoothing as `Seq2SeqObjective` (and, as there, the reference's
      NLL of the fused score for a SurfaceFusion "hard"/"gate" model: `decoder_nll`).
    - denoise: cross-entropy of the `denoise_head` model head (`heads.DenoisingHead`) against
      `encoder_noise_labels` over view N's positions (`view_positions`).
    - contrast: symmetric NT-Xent (`losses.nt_xent`) between the L2-normalised masked mean
      pools of the two views' encoder outputs, one example per packed segment (at most
      `max_segments_per_row`; the `contrast_dropped_segments` metric counts any beyond it).
      Negatives are the whole (micro)batch, or, with `per_shard_negatives=S`, each of S
      contiguous blocks of rows (the per-device batch when S is the data-parallel size, as the
      reference's per-GPU negatives). Under gradient accumulation the negatives are those of
      each microbatch; the other terms accumulate exactly.
    - slm: cross-entropy of the `slm_head` model head (`heads.SLMHead`) against the original
      tokens at the positions labelled `replaced_label` (`slm_targets`), only there. With
      `slm_positions_per_row=K` the vocabulary logits are computed at the first K such
      positions of each row only (`slm_dropped_positions` counts the others).
    - same_document: cross-entropy of the `same_document_head` model head
      (`heads.SameDocumentHead`) mean-pooled over each packed example of view M that has a pair
      (at most `max_segments_per_row` per row), against its `encoder_pair_labels`; one term
      per example (`pair_slots`).

    Metrics (additive contributions, as every objective's): `loss`, `nll_noised`,
    `nll_masked` (cross-entropy without z-loss), `z_loss` (the weighted z-loss part of
    `loss`); for the per-position head named H (`denoise_head`: "denoise" for E2S2, "rts"):
    `H_loss`, `H_accuracy`, `H_majority_rate` (the fraction of positions labelled 0,
    untouched / original: the accuracy of the majority-class guess); `contrast_loss`,
    `contrast_accuracy` (anchors whose positive beats every negative),
    `contrast_dropped_segments`; for SLM's head S (`slm_head`): `S_loss`, `S_accuracy`,
    `S_majority_rate` (the accuracy of always answering the batch's commonest original token),
    `S_dropped_positions`; for the pair head P (`same_document_head`): `P_loss`,
    `P_accuracy`, `P_majority_rate` (the accuracy of always answering the batch's commonest
    pair label), `P_dropped_segments`; each only when its term is computed. Normalizers:
    `weight_sum` (target tokens), `H_weight_sum` (view N's positions), `contrast_anchor_count`
    (2 x pooled examples), `S_weight_sum` (swapped positions), `S_majority_count`,
    `P_weight_sum` (examples with a pair), `P_majority_count`.
    """

    nll_noised_weight: float = 0.5
    nll_masked_weight: float = 0.5
    denoise_weight: float = 0.05
    contrast_weight: float = 0.05
    slm_weight: float = 0.0
    temperature: float = 1.0
    per_shard_negatives: int | None = None
    max_segments_per_row: int = 8
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    denoise_head: str = "denoise"
    slm_head: str = "slm"
    replaced_label: int = view_labels.E2S2_REPLACED
    slm_positions_per_row: int | None = None
    same_document_weight: float = 0.0
    same_document_head: str = "same_document"

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"E2S2Objective.temperature={self.temperature} must be positive.")
        if self.per_shard_negatives is not None and self.per_shard_negatives < 1:
            raise ValueError(
                f"E2S2Objective.per_shard_negatives={self.per_shard_negatives}: use None "
                "(global negatives) or the number of data-parallel shards."
            )
        if self.max_segments_per_row < 1:
            raise ValueError("E2S2Objective.max_segments_per_row must be at least 1.")
        if self.slm_positions_per_row is not None and self.slm_positions_per_row < 1:
            raise ValueError(
                f"E2S2Objective.slm_positions_per_row={self.slm_positions_per_row}: use None "
                "(every position) or a positive count."
            )
        if self.denoise_head == self.slm_head:
            raise ValueError(
                f"E2S2Objective.denoise_head and slm_head are both {self.slm_head!r}: name the "
                "two heads apart (e.g. 'rts' and 'slm')."
            )

    @property
    def views(self) -> tuple[str, ...]:
        """The encoder input features run through the model, in row order within a pair."""
        noised = self.nll_noised_weight != 0 or self.denoise_weight != 0 or self.slm_weight != 0
        masked = self.nll_masked_weight != 0 or self.same_document_weight != 0
        if self.contrast_weight != 0:
            noised = masked = True
        return tuple(
            name for name, used in ((NOISED_TOKENS, noised), (MASKED_TOKENS, masked)) if used
        )

    def _check_batch(self, batch: Batch) -> None:
        needed = [NOISED_TOKENS] if NOISED_TOKENS in self.views else []
        if self.denoise_weight != 0 or self.slm_weight != 0 or self.contrast_weight != 0:
            needed.append(NOISE_LABELS)
        if self.same_document_weight != 0 and PAIR_LABELS not in batch:
            raise ValueError(
                f"E2S2Objective.same_document_weight={self.same_document_weight} needs "
                f"{PAIR_LABELS!r} in the batch, which has {sorted(batch)}. Build batches from "
                "the same-document task (tasks/same_document.py) with "
                "E2S2EncDecFeatureConverter(with_pair_labels=True)."
            )
        missing = [name for name in needed if name not in batch]
        if missing:
            raise ValueError(
                f"E2S2Objective needs view N's {missing} in the batch, which has "
                f"{sorted(batch)}. Build batches from a task with a second view (e.g. "
                "bundled_e2s2, bundled_rts, bundled_slm, c4_e2s2) with "
                "E2S2EncDecFeatureConverter(with_noised_view=True) (Gin: "
                "E2S2EncDecFeatureConverter.with_noised_view = True)."
            )

    def _pool_valid(self, batch: Batch) -> jax.Array:
        """`[batch, max_segments]`: slots holding a segment with a second view in both views."""
        segment_ids = batch.get("encoder_segment_ids")
        has_view = batch[NOISE_LABELS] != view_labels.NO_SECOND_VIEW
        valid = None
        for name in (NOISED_TOKENS, MASKED_TOKENS):
            membership = heads.segment_membership(
                (batch[name] != 0) & has_view, segment_ids, self.max_segments_per_row
            )
            view_valid = jnp.sum(membership, axis=1) > 0
            valid = view_valid if valid is None else valid & view_valid
        return valid

    def _slm_weights(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """`(targets, weights)` `[batch, length]` of the SLM term (`slm_targets`)."""
        targets = slm_targets(batch[MASKED_TOKENS], batch[NOISE_LABELS], self.replaced_label)
        targets = jnp.where(view_positions(batch), targets, 0)
        return targets, (targets != 0).astype(jnp.float32)

    def pair_slots(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """`(labels, valid)` `[batch, max_segments]`: each packed example's pair label (0 where
        none) and whether the slot holds an example with a pair."""
        labels = batch[PAIR_LABELS]
        membership = heads.segment_membership(
            (batch[MASKED_TOKENS] != 0) & (labels != view_labels.NO_PAIR),
            batch.get("encoder_segment_ids"),
            self.max_segments_per_row,
        )
        counts = jnp.sum(membership, axis=1)
        # One label per example, repeated at its positions: the mean is that label.
        sums = jnp.einsum("bls,bl->bs", membership, labels.astype(jnp.float32))
        slot_labels = jnp.round(sums / jnp.maximum(counts, 1.0)).astype(jnp.int32)
        return slot_labels, counts > 0

    def normalizers(self, batch: Batch) -> Metrics:
        self._check_batch(batch)
        normalizers = {"weight_sum": jnp.sum(target_weights(batch))}
        if self.denoise_weight != 0:
            normalizers[f"{self.denoise_head}_weight_sum"] = jnp.sum(view_positions(batch)).astype(
                jnp.float32
            )
        if self.contrast_weight != 0:
            normalizers["contrast_anchor_count"] = 2.0 * jnp.sum(self._pool_valid(batch)).astype(
                jnp.float32
            )
        if self.slm_weight != 0:
            targets, weights = self._slm_weights(batch)
            normalizers[f"{self.slm_head}_weight_sum"] = jnp.sum(weights)
            normalizers[f"{self.slm_head}_majority_count"] = mode_count(targets, weights)
        if self.same_document_weight != 0:
            labels, valid = self.pair_slots(batch)
            name = self.same_document_head
            normalizers[f"{name}_weight_sum"] = jnp.sum(valid).astype(jnp.float32)
            normalizers[f"{name}_majority_count"] = mode_count(labels, valid)
        return normalizers

    def _head_output(self, intermediates, head: str, weight_name: str, factory: str):
        head_outputs = intermediates["heads"]
        if head not in head_outputs:
            raise ValueError(
                f"E2S2Objective.{weight_name}={getattr(self, weight_name)} needs the model head "
                f"{head!r}, but the model has {sorted(head_outputs)}: build "
                f"T5(config, encoder_heads=(({head!r}, {factory}),)) (Gin: "
                f"T5.encoder_heads = (({head!r}, @{factory}),)), or set {weight_name} = 0."
            )
        return head_outputs[head]

    def __call__(self, model, params, batch, normalizers, dropout_rng, *, attention_entropy=False):
        self._check_batch(batch)
        views = self.views
        num_views = len(views)
        batch_size = batch[MASKED_TOKENS].shape[0]
        # [batch * views, ...]: row r of view v at r * views + v.
        model_batch = {
            name: jnp.repeat(value, num_views, axis=0)
            for name, value in batch.items()
            if name.startswith("decoder_") or name == "encoder_segment_ids"
        }
        model_batch[MASKED_TOKENS] = jnp.stack([batch[name] for name in views], axis=1).reshape(
            batch_size * num_views, *batch[MASKED_TOKENS].shape[1:]
        )
        need_encoder = any(
            weight != 0
            for weight in (
                self.denoise_weight,
                self.contrast_weight,
                self.slm_weight,
                self.same_document_weight,
            )
        )
        outputs, entropy = apply_seq2seq(
            model,
            params,
            model_batch,
            dropout_rng,
            return_intermediates=need_encoder,
            attention_entropy=attention_entropy,
        )
        logits, intermediates = outputs if need_encoder else (outputs, None)

        def view_rows(x: jax.Array, view: str) -> jax.Array:
            return x.reshape(batch_size, num_views, *x.shape[1:])[:, views.index(view)]

        loss = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        z_total = jnp.zeros((), jnp.float32)
        denominator = safe_denominator(normalizers["weight_sum"])
        for view, weight, metric in (
            (NOISED_TOKENS, self.nll_noised_weight, "nll_noised"),
            (MASKED_TOKENS, self.nll_masked_weight, "nll_masked"),
        ):
            if weight == 0:
                continue
            loss_sum, z_sum, _ = decoder_nll(
                model,
                view_rows(logits, view),
                batch["decoder_target_tokens"],
                target_weights(batch),
                z_loss=self.z_loss,
                label_smoothing=self.label_smoothing,
            )
            loss += weight * loss_sum / denominator
            z_total += weight * z_sum / denominator
            metrics[metric] = (loss_sum - z_sum) / denominator
        metrics["z_loss"] = z_total

        if self.denoise_weight != 0:
            name = self.denoise_head
            head_logits = self._head_output(intermediates, name, "denoise_weight", "DenoisingHead")
            noise_logits = view_rows(head_logits, NOISED_TOKENS)
            positions = view_positions(batch).astype(jnp.float32)
            # NO_SECOND_VIEW is outside the head's classes: such positions weigh 0 anyway.
            labels = jnp.where(positions > 0, batch[NOISE_LABELS], 0)
            denoise_sum, _, _ = losses.cross_entropy_with_logits(noise_logits, labels, positions)
            denoise_denominator = safe_denominator(normalizers[f"{name}_weight_sum"])
            metrics[f"{name}_loss"] = denoise_sum / denoise_denominator
            metrics[f"{name}_accuracy"] = (
                losses.classification_accuracy_sum(noise_logits, labels, positions)
                / denoise_denominator
            )
            # The accuracy of always answering label 0 (untouched / original), the majority
            # class: what the accuracy must beat to show the head detects noise.
            metrics[f"{name}_majority_rate"] = (
                jnp.sum((labels == 0) * positions) / denoise_denominator
            )
            loss += self.denoise_weight * metrics[f"{name}_loss"]

        if self.contrast_weight != 0:
            encoder_outputs = intermediates["encoder"]
            segment_ids = model_batch.get("encoder_segment_ids")
            embeddings, _ = heads.contrastive_embeddings(
                encoder_outputs, segment_ids, self.max_segments_per_row
            )
            embed = embeddings.shape[-1]
            # [batch * segments, embed] per view: examples ordered by row, so contiguous row
            # blocks (devices) are contiguous example blocks.
            noised = view_rows(embeddings, NOISED_TOKENS).reshape(-1, embed)
            masked = view_rows(embeddings, MASKED_TOKENS).reshape(-1, embed)
            valid = self._pool_valid(batch).reshape(-1)
            num_groups = self.per_shard_negatives or 1
            if batch_size % num_groups:
                raise ValueError(
                    f"E2S2Objective.per_shard_negatives={num_groups} does not divide the "
                    f"(micro)batch of {batch_size} rows."
                )
            contrast_sum, contrast_correct, _ = losses.nt_xent(
                noised, masked, valid, temperature=self.temperature, num_groups=num_groups
            )
            contrast_denominator = safe_denominator(normalizers["contrast_anchor_count"])
            metrics["contrast_loss"] = contrast_sum / contrast_denominator
            metrics["contrast_accuracy"] = contrast_correct / contrast_denominator
            metrics["contrast_dropped_segments"] = heads.dropped_segments(
                batch[MASKED_TOKENS] != 0,
                batch.get("encoder_segment_ids"),
                self.max_segments_per_row,
            )
            loss += self.contrast_weight * metrics["contrast_loss"]

        if self.slm_weight != 0:
            loss += self.slm_weight * self._slm_term(
                intermediates, batch, normalizers, view_rows, metrics
            )

        if self.same_document_weight != 0:
            loss += self.same_document_weight * self._same_document_term(
                intermediates, batch, normalizers, view_rows, metrics
            )

        metrics["loss"] = loss
        return loss, {**metrics, **entropy}

    def _same_document_term(
        self, intermediates, batch, normalizers, view_rows, metrics
    ) -> jax.Array:
        """The pair classifier's loss (per example with a pair in the global batch); writes its
        metrics."""
        name = self.same_document_head
        head_logits = self._head_output(
            intermediates, name, "same_document_weight", "SameDocumentHead"
        )
        labels, valid = self.pair_slots(batch)
        pooled, _ = heads.segment_mean_pool(
            view_rows(head_logits, MASKED_TOKENS),
            (batch[MASKED_TOKENS] != 0) & (batch[PAIR_LABELS] != view_labels.NO_PAIR),
            batch.get("encoder_segment_ids"),
            self.max_segments_per_row,
        )
        weights = valid.astype(jnp.float32)
        classifier_metrics(name, pooled, labels, weights, jnp.sum(weights), normalizers, metrics)
        metrics[f"{name}_dropped_segments"] = heads.dropped_segments(
            (batch[MASKED_TOKENS] != 0) & (batch[PAIR_LABELS] != view_labels.NO_PAIR),
            batch.get("encoder_segment_ids"),
            self.max_segments_per_row,
        )
        return metrics[f"{name}_loss"]

    def _slm_term(self, intermediates, batch, normalizers, view_rows, metrics) -> jax.Array:
        """SLM's loss (per swapped position of the global batch); writes its metrics."""
        name = self.slm_head
        slm_outputs = self._head_output(intermediates, name, "slm_weight", "SLMHead")
        hidden = view_rows(slm_outputs.hidden, NOISED_TOKENS)
        targets, weights = self._slm_weights(batch)
        if self.slm_positions_per_row is not None:
            count = min(self.slm_positions_per_row, targets.shape[1])
            positions, kept = first_positions(weights > 0, count)
            metrics[f"{name}_dropped_positions"] = jnp.sum(weights) - jnp.sum(kept)
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
            targets = jnp.take_along_axis(targets, positions, axis=1)
            weights = kept.astype(jnp.float32)
        vocab_logits = heads.slm_logits(slm_outputs, hidden)
        # Every swapped position counts in the majority rate, kept by the budget or not.
        share = jnp.sum(self._slm_weights(batch)[1])
        classifier_metrics(name, vocab_logits, targets, weights, share, normalizers, metrics)
        return metrics[f"{name}_loss"]
