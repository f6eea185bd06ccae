"""T5's configuration, the constants every model module shares, and the activation and
parameter-init helpers they build layers with."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# One large negative score for "never": the additive bias of masked attention positions and the
# score of impossible tokens and beams in decoding (Hugging Face's sentinel for impossible
# beams). It stays finite in float32, so sums and differences of it stay finite too, and exp of
# it underflows to exactly 0.
NEG_INF = -1.0e9

FEED_FORWARD_PROJS = ("gated-gelu", "relu", "gated-relu", "gelu")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes and options of a T5 model. Defaults are T5 1.1 small."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    # "gated-gelu" is T5 1.1 (tanh-approximate GELU, as HF's gelu_new); "relu" is T5 1.0.
    feed_forward_proj: str = "gated-gelu"
    # T5 1.0 ties the output projection to the input embedding and scales the decoder output
    # by d_model**-0.5 before it; T5 1.1 does neither. (HF 5.x can also tie without scaling.)
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    # sigmaReparam (`models/sigma_reparam.py`): every attention and feed-forward kernel of the
    # encoder and decoder layers trained as gamma / sigma(W) * W. Off: the params are T5's.
    sigma_reparam: bool = False
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"use one of {FEED_FORWARD_PROJS}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"T5Config.remat_policy={self.remat_policy!r} is not supported; "
                f"use one of {REMAT_POLICIES}."
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"T5Config.dtype={self.dtype!r}: use float32, bfloat16 or float16.")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")


def activation_fn(name: str) -> Callable[[Array], Array]:
    """The activation of `T5Config.feed_forward_proj` `name` (its gating prefix ignored)."""
    base = name.split("-")[-1]
    if base == "gelu":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.relu


def normal_init(stddev: float, axes: tuple[str, ...]):
    """A `normal(stddev)` initializer whose parameter carries the logical `axes`."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)
