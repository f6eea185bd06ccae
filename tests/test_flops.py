"""Model FLOPs (`training/flops.py`) against an independent count: the FLOPs of every
`dot_general` in the traced program (forward, and the full value-and-grad), walked through
nested jaxprs and scaled by scan lengths by `benchmarks/matmul_roofline.py`, which times those
dots; and that benchmark's einsum form of a dot."""

import functools

import jax
import numpy as np
import pytest
from jax import lax

from benchmarks.e2s2_step import synthetic_batch
from benchmarks.matmul_roofline import dot_flops as roofline_dot_flops
from benchmarks.matmul_roofline import einsum_equation, step_dots, traced_step_dots
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.fusion import SurfaceFusion
from e2s2_jax.models.t5 import T5
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


def dot_flops(jaxpr) -> int:
    """2 * multiply-adds of every float dot_general in `jaxpr` and its sub-jaxprs (scan bodies
    times their length), from the dots `benchmarks/matmul_roofline.py` collects."""
    return sum(count * roofline_dot_flops(*key) for key, count in step_dots(jaxpr).items())


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


# benchmarks/matmul_roofline.py: the dots it collects from the traced step add up to these model
# FLOPs, and the einsum it times in torch is the same contraction as the dot_general.


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, dimension_numbers",
    [
        ((6, 4), (4, 5), (((1,), (0,)), ((), ()))),  # plain matmul
        ((6, 4), (6, 5), (((0,), (0,)), ((), ()))),  # kernel gradient: contract the rows
        ((2, 7, 3, 4), (2, 9, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),  # attention scores
        ((3, 2, 5), (5, 2, 4), (((2,), (0,)), ((1,), (1,)))),  # batch dims not leading
    ],
)
def test_einsum_equation_and_flops_match_dot_general(lhs_shape, rhs_shape, dimension_numbers):
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal(lhs_shape).astype(np.float32)
    rhs = rng.standard_normal(rhs_shape).astype(np.float32)
    want = np.asarray(lax.dot_general(lhs, rhs, dimension_numbers))
    equation = einsum_equation(len(lhs_shape), len(rhs_shape), dimension_numbers)
    np.testing.assert_allclose(np.einsum(equation, lhs, rhs), want, rtol=1e-5, atol=1e-5)
    (lhs_contract, _), _ = dimension_numbers
    contracted = int(np.prod([lhs_shape[d] for d in lhs_contract]))
    assert roofline_dot_flops(lhs_shape, rhs_shape, dimension_numbers) == 2 * want.size * contracted


@pytest.mark.parametrize("scan_layers", [False, True])
def test_step_dots_add_up_to_the_model_flops_of_the_step(scan_layers):
    config = T5Config(**{**SMALLISH.__dict__, "scan_layers": scan_layers})
    batch = synthetic_batch(0, 3, 11, 5, config.vocab_size)
    dots = traced_step_dots(T5(config), batch)
    total = sum(count * roofline_dot_flops(*key) for key, count in dots.items())
    # With scanned layers this holds only if a scan body's dots count once per layer.
    assert total == flops.step_flops(config, 3, 11, 5).train
