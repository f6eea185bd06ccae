"""Attention entropy, the diagnostic of attention collapse (sigmaReparam's paper: low entropy
goes with loss spikes and divergence): per layer of each kind (encoder self-attention, decoder
self-attention, cross-attention), the entropy of each query's attention distribution over the
keys its mask allows, averaged over heads and non-pad query positions.

The attention modules `sow` each query's head-averaged entropy `[batch, q_len]` into the
`attention_entropy` collection only when the caller makes that collection mutable (the train
step's entropy variant, `training/train_step.py`); every other program traces nothing for it.
`entropy_terms` turns the sown tree into additive sums and counts (so that microbatches add up
exactly, like every objective metric) and `finish_entropy_metrics` divides them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

Array = jax.Array

ENTROPY_COLLECTION = "attention_entropy"
# Attention module name (its parameter path) -> the kind of attention it is, and whose
# positions are its queries.
KINDS = {
    "attention": ("encoder_self", "encoder"),
    "self_attention": ("decoder_self", "decoder"),
    "encoder_decoder_attention": ("cross", "decoder"),
}
SUM_PREFIX = "attention_entropy_sum/"
COUNT_PREFIX = "attention_entropy_count/"
METRIC_PREFIX = "attention_entropy/"


def query_entropy(logits: Array) -> Array:
    """`[batch, q_len]` float32: the entropy (nats) of each query's attention distribution,
    `-sum_k p_k log p_k` over keys, averaged over heads, from the masked logits
    `[batch, heads, q_len, k_len]` (scores + position bias + mask bias). Masked keys have
    `p_k = 0` exactly (exp of NEG_INF underflows) and add nothing."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return jnp.mean(entropy, axis=1)


def _layer_entropies(sown: Mapping[str, Any]):
    """Yields `(kind, queries, layer, [batch, q_len] entropy)` for every attention layer in the
    sown tree, in the unscanned (`layers_3/...`) or scanned (`layers/...`, a leading layer axis)
    layout."""
    for path, values in traverse_util.flatten_dict(dict(sown)).items():
        (value,) = values  # `sow` appends to a tuple; each layer's module is called once
        kind, queries = KINDS[path[-2]]
        layer_names = [name for name in path if re.fullmatch(r"layers(_\d+)?", name)]
        if layer_names and layer_names[-1] != "layers":
            yield kind, queries, int(layer_names[-1].split("_")[1]), value
        else:  # scanned: one slice per layer
            for layer in range(value.shape[0]):
                yield kind, queries, layer, value[layer]


def entropy_terms(
    sown: Mapping[str, Any], encoder_valid: Array, decoder_valid: Array
) -> dict[str, Array]:
    """Additive metric terms from the sown `attention_entropy` collection: for every layer the
    sum of its query entropies over non-pad queries (`attention_entropy_sum/<kind>/layer_<i>`),
    and per kind the number of non-pad queries (`attention_entropy_count/<kind>`).

    `encoder_valid` `[batch, inputs_length]` and `decoder_valid` `[batch, targets_length]` are
    true at non-pad positions of the rows the model ran on: encoder self-attention's queries
    are encoder positions, decoder self- and cross-attention's are decoder positions.
    """
    valid = {
        "encoder": encoder_valid.astype(jnp.float32),
        "decoder": decoder_valid.astype(jnp.float32),
    }
    terms: dict[str, Array] = {}
    for kind, queries, layer, entropy in _layer_entropies(sown):
        terms[f"{SUM_PREFIX}{kind}/layer_{layer}"] = jnp.sum(entropy * valid[queries])
        terms[f"{COUNT_PREFIX}{kind}"] = jnp.sum(valid[queries])
    return terms


def finish_entropy_metrics(metrics: Mapping[str, Array]) -> dict[str, Array]:
    """`metrics` with the entropy sums and counts of `entropy_terms` (already summed over
    microbatches) replaced by means: `attention_entropy/<kind>/layer_<i>` per layer and
    `attention_entropy/<kind>` over that kind's layers. Other metrics pass through."""
    out = {
        name: value
        for name, value in metrics.items()
        if not name.startswith((SUM_PREFIX, COUNT_PREFIX))
    }
    per_kind: dict[str, list[Array]] = {}
    for name, value in metrics.items():
        if not name.startswith(SUM_PREFIX):
            continue
        kind, layer = name[len(SUM_PREFIX) :].split("/")
        count = metrics[f"{COUNT_PREFIX}{kind}"]
        mean = value / jnp.where(count > 0, count, 1.0)
        out[f"{METRIC_PREFIX}{kind}/{layer}"] = mean
        per_kind.setdefault(kind, []).append(mean)
    for kind, means in per_kind.items():
        out[f"{METRIC_PREFIX}{kind}"] = jnp.mean(jnp.stack(means))
    return out
