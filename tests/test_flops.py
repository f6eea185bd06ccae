"""Model FLOPs (`training/flops.py`) against an independent count: the FLOPs of every
`dot_general` in the traced program (forward, and the full value-and-grad), walked through
nested jaxprs and scaled by scan lengths."""

import functools
import math

import jax
import numpy as np
import pytest
from jax.extend import core

from e2s2_jax.models.fusion import SurfaceFusion
from e2s2_jax.models.t5 import T5, T5Config
from e2s2_jax.objectives import Seq2SeqObjective
from e2s2_jax.training import flops

SMALLISH = T5Config(
    vocab_size=96,
    d_model=24,
    num_heads=3,
    d_kv=8,
    d_ff=40,
    num_encoder_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def dot_flops(jaxpr) -> int:
    """2 * multiply-adds of every dot_general in `jaxpr` and its sub-jaxprs (scan bodies times
    their length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            contracted = math.prod(lhs[d] for d in lhs_contract)
            total += 2 * math.prod(out) * contracted
            del lhs_batch  # batch dims are part of the output shape
        multiplier = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _sub_jaxprs(eqn.params):
            total += multiplier * dot_flops(sub)
    return total


def _batch(batch_size, inputs_length, targets_length, vocab):
    rng = np.random.default_rng(0)
    targets = rng.integers(2, vocab, (batch_size, targets_length)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, vocab, (batch_size, inputs_length)).astype(
            np.int32
        ),
        "decoder_input_tokens": np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
    }


def traced_flops(model: T5, batch_size: int, lengths: tuple[int, int]) -> tuple[int, int]:
    """The matmul FLOPs of the traced span-corruption loss, and of its gradient."""
    batch = _batch(batch_size, *lengths, model.config.vocab_size)
    params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
        )
    )["params"]
    objective = Seq2SeqObjective()
    normalizers = objective.normalizers(batch)

    def loss(p):
        return objective(model, p, batch, normalizers, None)[0]

    forward = dot_flops(jax.make_jaxpr(loss)(params).jaxpr)
    return forward, dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)


@pytest.mark.parametrize(
    "changes",
    [{}, {"feed_forward_proj": "relu", "tie_word_embeddings": True}, {"scan_layers": True}],
    ids=["t5_1_1", "t5_1_0", "scanned"],
)
@pytest.mark.parametrize("lengths", [(11, 5), (7, 13)])
def test_step_flops_equal_the_traced_matmuls(changes, lengths):
    config = T5Config(**{**SMALLISH.__dict__, **changes})
    forward, train = traced_flops(T5(config), 3, lengths)
    expected = flops.step_flops(config, 3, *lengths)
    assert expected.forward == forward
    # The backward of each matmul is two matmuls of its size: the step is exactly 3x.
    assert expected.train == train


@pytest.mark.parametrize("mode,ffn_dim", [("hard", 0), ("gate", 12)])
def test_surface_fusion_flops_equal_the_traced_matmuls(mode, ffn_dim):
    """SurfaceFusion's output layer counted as well; its stopped query and key inputs get no
    gradient, so the step is 3x the forward less those two projections."""
    lengths = (11, 5)
    layer = functools.partial(SurfaceFusion, mode=mode, ffn_dim=ffn_dim)
    model = T5(SMALLISH, output_layer_factory=layer)
    forward, train = traced_flops(model, 3, lengths)
    expected = flops.step_flops(SMALLISH, 3, *lengths, model.output_layer_factory(SMALLISH))
    plain = flops.step_flops(SMALLISH, 3, *lengths)
    assert expected.surface_fusion > 0 and expected.encoder == plain.encoder
    assert expected.forward == forward
    assert expected.train == train
    assert expected.train < 3 * expected.forward


def test_flops_per_token_is_six_n_plus_attention():
    # The per-token figure of a long-context-free limit: with lengths of 1, attention is
    # negligible and a row costs 6 x (matmul parameters the row's two tokens touch).
    config = SMALLISH
    row = flops.step_flops(config, 1, 1, 1).train  # one input and one target token
    d, i, f = config.d_model, config.num_heads * config.d_kv, config.d_ff
    encoder_params = config.num_encoder_layers * (4 * d * i + 3 * d * f)
    decoder_params = config.num_decoder_layers * (8 * d * i + 3 * d * f) + d * config.vocab_size
    attention = 3 * (config.num_encoder_layers * 4 * i + config.num_decoder_layers * 8 * i)
    assert row == 6 * (encoder_params + decoder_params) + attention
