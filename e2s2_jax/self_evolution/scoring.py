"""Per-token informativeness of a span-corruption model: each token's cross-entropy when the
model restores it as part of a masked span, teacher-forced.

An example of n tokens is cut into blocks of `span_length` tokens; round r of `num_rounds`
masks the blocks k with k % num_rounds == r, in T5's span-corruption format (sentinel per block
in the inputs; sentinel + block in the targets). Over the rounds every token is masked exactly
once, with about 1 / num_rounds of its context masked too: the task the model was trained on,
at about its noise density (3-token spans, 7 rounds: 14%).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e2s2_jax.training import partitioning


@dataclasses.dataclass
class ScoringRow:
    """One (example, round) row: model inputs, targets, and the example position each target
    scores (-1 for sentinels and eos)."""

    example_index: int
    inputs: list[int]
    targets: list[int]
    scored_positions: list[int]


def scoring_rows(
    tokens: np.ndarray,
    example_index: int,
    *,
    span_length: int,
    num_rounds: int,
    vocab_size: int,
    eos_id: int,
) -> list[ScoringRow]:
    """The span-corrupted rows whose targets together score every one of `tokens` once."""
    num_blocks = -(-len(tokens) // span_length)
    rows = []
    for round_index in range(min(num_rounds, num_blocks)):
        inputs, targets, positions = [], [], []
        sentinel = vocab_size - 1
        for block in range(num_blocks):
            start, stop = block * span_length, min((block + 1) * span_length, len(tokens))
            block_tokens = [int(t) for t in tokens[start:stop]]
            if block % num_rounds == round_index:
                inputs.append(sentinel)
                targets += [sentinel, *block_tokens]
                positions += [-1, *range(start, stop)]
                sentinel -= 1
            else:
                inputs += block_tokens
        rows.append(
            ScoringRow(example_index, [*inputs, eos_id], [*targets, eos_id], [*positions, -1])
        )
    return rows


def sentinels_needed(num_tokens: int, span_length: int, num_rounds: int) -> int:
    """The most sentinels one row of an example of `num_tokens` tokens uses."""
    num_blocks = -(-num_tokens // span_length)
    return -(-num_blocks // num_rounds)


class TokenScorer:
    """Teacher-forced per-target-token cross-entropy of `model` under `params`:
    `[batch, length]` rows sharded over the mesh's batch axes."""

    def __init__(self, model, params, mesh, rules):
        self.params, self.mesh, self.rules = params, mesh, rules
        self.sharding = partitioning.batch_sharding(mesh, rules)

        def token_cross_entropy(params, inputs, decoder_inputs, targets):
            logits = model.apply({"params": params}, inputs, decoder_inputs, targets)
            logits = logits.astype(jnp.float32)
            target_logits = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            return jax.nn.logsumexp(logits, axis=-1) - target_logits

        self._score = jax.jit(token_cross_entropy)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """float32 [batch, target length] cross-entropies (nats) of int32 `targets` given
        `inputs`; decoder inputs are the targets shifted right (T5's start id 0)."""
        decoder_inputs = np.zeros_like(targets)
        decoder_inputs[:, 1:] = targets[:, :-1]
        arrays = [
            jax.device_put(jnp.asarray(x, jnp.int32), self.sharding)
            for x in (inputs, decoder_inputs, targets)
        ]
        with self.mesh, nn.logical_axis_rules(self.rules):
            return np.asarray(self._score(self.params, *arrays))


def score_examples(
    examples: list[np.ndarray],
    scorer: TokenScorer,
    *,
    batch_size: int,
    span_length: int,
    num_rounds: int,
    vocab_size: int,
    eos_id: int,
    length_bucket: int = 32,
) -> list[np.ndarray]:
    """float32 [n] informativeness (cross-entropy, nats) of every token of each example."""
    rows = []
    for index, tokens in enumerate(examples):
        rows += scoring_rows(
            tokens,
            index,
            span_length=span_length,
            num_rounds=num_rounds,
            vocab_size=vocab_size,
            eos_id=eos_id,
        )
    scores = [np.full(len(tokens), np.nan, np.float32) for tokens in examples]
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        input_length = _round_up(max(len(r.inputs) for r in batch), length_bucket)
        target_length = _round_up(max(len(r.targets) for r in batch), length_bucket)
        inputs = np.zeros((batch_size, input_length), np.int32)
        targets = np.zeros((batch_size, target_length), np.int32)
        inputs[:, 0] = targets[:, 0] = eos_id  # padding rows: empty
        for i, row in enumerate(batch):
            inputs[i, : len(row.inputs)] = row.inputs
            targets[i, : len(row.targets)] = row.targets
        cross_entropy = scorer(inputs, targets)
        for i, row in enumerate(batch):
            positions = np.asarray(row.scored_positions)
            scored = positions >= 0
            scores[row.example_index][positions[scored]] = cross_entropy[i, : len(positions)][
                scored
            ]
    return scores


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
