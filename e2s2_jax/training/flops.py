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
because the model computes them all. Embedding lookups, norms, softmaxes, the loss and the
optimizer are not matmuls and are not counted; neither are E2S2's 3-way head and NT-Xent
(well under 1% of a step) nor SurfaceFusion's output layer.
"""

from __future__ import annotations

import dataclasses

from e2s2_jax.models.t5 import T5Config


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward matmul FLOPs of one batch, by part; `train` is 3x their sum."""

    encoder: float
    decoder: float
    output_projection: float

    @property
    def forward(self) -> float:
        return self.encoder + self.decoder + self.output_projection

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def step_flops(
    config: T5Config, batch_size: int, inputs_length: int, targets_length: int
) -> StepFlops:
    """Model FLOPs of a batch of `batch_size` rows of `inputs_length` encoder and
    `targets_length` decoder positions (see the module docstring)."""
    d, f, vocab = config.d_model, config.d_ff, config.vocab_size
    inner = config.num_heads * config.d_kv
    n_ff = 3 if config.is_gated else 2
    li, lt = inputs_length, targets_length
    encoder_layer = li * (2 * (4 * d * inner + n_ff * d * f) + 4 * li * inner)
    decoder_layer = lt * (2 * (6 * d * inner + n_ff * d * f) + 4 * (lt + li) * inner)
    decoder_layer += li * 4 * d * inner
    return StepFlops(
        encoder=float(batch_size * config.num_encoder_layers * encoder_layer),
        decoder=float(batch_size * config.num_decoder_layers * decoder_layer),
        output_projection=float(batch_size * lt * 2 * d * vocab),
    )
