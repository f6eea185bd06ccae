"""Model FLOPs of a T5 train step, for MFU (model FLOPs utilisation).

Model FLOPs count the matrix multiplications the model needs, 2 FLOPs per multiply-add, on the
batch's shapes (every position of `[batch, length]`, pad included: with packing rows are full),
independent of how the step is compiled: rematerialised recomputation is not counted, as in
PaLM's and MaxText's MFU. A train step is forward + backward = 3x the forward matmuls (the
backward of `x @ w` is two matmuls of the same size). Per token this is the usual
`6N + attention` estimate, made exact for the encoder-decoder:

  encoder layer, per input token:   2 * (4 d i + n_ff d f) + 2 * 2 L_in i       (QK^T and AV)
  decoder layer, per target token:  2 * (6 d i + n_ff d f) + 2 * 2 (L_tgt + L_in) i
  decoder layer, per input token:   2 * 2 d i                  (cross-attention keys, values)
  output projection, per target:    2 d V

with `d = d_model`, `i = num_heads * d_kv`, `f = d_ff`, `n_ff` 3 for gated feed-forwards and 2
otherwise, `V = vocab_size`. Attention is counted over the full `L x L` scores, causal or not,
because the model computes them all.

SurfaceFusion's output layer (`models/fusion.py`, width `w = d_model`, residual FFN width `h`)
adds, per target token, its surface attention `2 * (2 d w + 2 L_in w)` (query, output and the
scores and context over the source), its residual FFN on both paths `2 * 2 * 2 d h`, the
second output head `2 d V` and, for "gate", `2 * 2 d`; per input token, the source keys and
values `2 * 2 d w`. The query and key projections read stopped activations, so their backward
is one matmul (the kernel's gradient), not two: a step is 3x the forward minus those two.

Embedding lookups, norms, softmaxes, the loss and the optimizer are not matmuls and are not
counted; neither are E2S2's 3-way head and NT-Xent (well under 1% of a step).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from e2s2_jax.models.config import T5Config
from e2s2_jax.models.fusion import SurfaceFusion


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward matmul FLOPs of one batch, by part; `train` is 3x their sum, less the input
    gradients that stopped activations do not need (`no_input_gradient`: the forward FLOPs of
    the matmuls whose input is stopped)."""

    encoder: float
    decoder: float
    output_projection: float
    surface_fusion: float = 0.0
    no_input_gradient: float = 0.0

    @property
    def forward(self) -> float:
        return self.encoder + self.decoder + self.output_projection + self.surface_fusion

    @property
    def train(self) -> float:
        return 3.0 * self.forward - self.no_input_gradient


def step_flops(
    config: T5Config,
    batch_size: int,
    inputs_length: int,
    targets_length: int,
    output_layer: nn.Module | None = None,
) -> StepFlops:
    """Model FLOPs of a batch of `batch_size` rows of `inputs_length` encoder and
    `targets_length` decoder positions (see the module docstring). `output_layer`: the
    model's output layer (`T5.output_layer_factory(config)`), counted when it is a
    `SurfaceFusion`; None or the plain projection add nothing."""
    d, f, vocab = config.d_model, config.d_ff, config.vocab_size
    inner = config.num_heads * config.d_kv
    n_ff = 3 if config.is_gated else 2
    li, lt = inputs_length, targets_length
    encoder_layer = li * (2 * (4 * d * inner + n_ff * d * f) + 4 * li * inner)
    decoder_layer = lt * (2 * (6 * d * inner + n_ff * d * f) + 4 * (lt + li) * inner)
    decoder_layer += li * 4 * d * inner
    fusion, stopped = 0, 0
    if isinstance(output_layer, SurfaceFusion):
        fusion, stopped = _surface_fusion(config, output_layer, li, lt)
    return StepFlops(
        encoder=float(batch_size * config.num_encoder_layers * encoder_layer),
        decoder=float(batch_size * config.num_decoder_layers * decoder_layer),
        output_projection=float(batch_size * lt * 2 * d * vocab),
        surface_fusion=float(batch_size * fusion),
        no_input_gradient=float(batch_size * stopped),
    )


def _surface_fusion(config: T5Config, layer: SurfaceFusion, li: int, lt: int) -> tuple[int, int]:
    """One row's forward matmul FLOPs of SurfaceFusion's output layer, and those of its
    query and key projections (whose inputs are stopped)."""
    d = width = config.d_model
    hidden = layer.ffn_dim or config.d_ff
    query, keys = lt * 2 * d * width, li * 2 * d * width
    attention = query + 2 * keys + lt * 2 * width * d + 2 * lt * 2 * li * width
    residual_ffns = 2 * lt * 2 * 2 * d * hidden
    source_head = lt * 2 * d * config.vocab_size
    gate = 2 * lt * 2 * d if layer.mode == "gate" else 0
    return attention + residual_ffns + source_head + gate, query + keys
