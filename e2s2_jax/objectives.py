"""Training objectives: what the train step differentiates.

An objective is a small object with two methods:

- `normalizers(batch) -> {name: scalar}`: the denominators of its loss terms (numbers of target
  tokens, of examples, ...), functions of the *whole* global batch only, never of the params.
- `__call__(model, params, batch, normalizers, dropout_rng) -> (loss, metrics)`: the loss of a
  (micro)batch, with every term already divided by its *global* normalizer, and metrics that are
  likewise additive contributions.

Because each microbatch's loss is its share of the full-batch loss, summing losses, gradients and
metrics over microbatches gives exactly the full-batch values, for any objective (see
`training/train_step.py`). Normalizers are reported as metrics as they are.

`Seq2SeqObjective` is T5's: token cross-entropy on the decoder (span corruption, prefix LM,
full reconstruction, fine-tuning all use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2s2_jax import losses

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
):
    """The model on a batch's encoder input (`input_feature`) and decoder features; dropout runs
    when `dropout_rng` is given."""
    return model.apply(
        {"params": params},
        batch[input_feature],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"),
        enable_dropout=dropout_rng is not None,
        return_intermediates=return_intermediates,
        rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
    )


def target_weights(batch: Batch) -> jax.Array:
    """`decoder_loss_weights`, or 1 at every non-pad target when the batch has none."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] != 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Seq2SeqObjective:
    """Decoder cross-entropy per weighted target token, with t5x's z-loss and label smoothing.

    Metrics: `loss` (cross-entropy + z-loss, the optimised value), `cross_entropy`, `z_loss`,
    `weight_sum` (target tokens in the global batch).
    """

    z_loss: float = 1e-4
    label_smoothing: float = 0.0

    def normalizers(self, batch: Batch) -> Metrics:
        return {"weight_sum": jnp.sum(target_weights(batch))}

    def __call__(self, model, params, batch, normalizers, dropout_rng):
        logits = apply_seq2seq(model, params, batch, dropout_rng)
        loss_sum, z_sum, _ = losses.cross_entropy_with_logits(
            logits,
            batch["decoder_target_tokens"],
            target_weights(batch),
            z_loss=self.z_loss,
            label_smoothing=self.label_smoothing,
        )
        denominator = safe_denominator(normalizers["weight_sum"])
        loss = loss_sum / denominator
        z_term = z_sum / denominator
        return loss, {"loss": loss, "cross_entropy": loss - z_term, "z_loss": z_term}
