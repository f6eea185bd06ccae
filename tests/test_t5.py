"""The T5 modules: logical axes, layouts (scan, remat), dtypes, intermediates, published sizes."""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from numerics import assert_close_to_scale

from e2s2_jax import configurables  # noqa: F401  (registers T5Config with Gin)
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.t5 import T5, scan_params, unscan_params

TINY = T5Config(
    vocab_size=64,
    d_model=16,
    num_heads=2,
    d_kv=8,
    d_ff=32,
    num_encoder_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "gin", "models")


def _tokens(seed, shape, vocab=64):
    return jnp.asarray(np.random.RandomState(seed).randint(2, vocab, shape), jnp.int32)


def _init(config, seed=0):
    encoder, decoder = _tokens(seed, (2, 9)), _tokens(seed + 1, (2, 6))
    return T5(config).init(jax.random.PRNGKey(seed), encoder, decoder), encoder, decoder


def _with(config, **changes):
    return T5Config(**{**config.__dict__, **changes})


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
    variables, _, _ = _init(_with(TINY, scan_layers=scan))
    leaves = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    table = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axes"
        assert len(leaf.names) == leaf.value.ndim, f"{name}: {leaf.names} vs {leaf.value.shape}"
        assert all(isinstance(n, str) for n in leaf.names), name
        table.append((name, leaf.value.shape, leaf.names))
    assert len(table) > 20
    if scan:
        assert all(names[0] == "layers" for name, _, names in table if "layers" in name)


def test_scan_and_unscanned_layouts_agree():
    variables, encoder, decoder = _init(TINY)
    params = nn.unbox(variables["params"])
    scanned = scan_params(params)
    plain_logits = T5(TINY).apply({"params": params}, encoder, decoder)
    scan_logits = T5(_with(TINY, scan_layers=True)).apply({"params": scanned}, encoder, decoder)
    # The same float32 arithmetic grouped differently (a scanned layer stack compiles to other
    # fusions and loop bodies): each of the ~70 sums on a logit's path (2 encoder and 3 decoder
    # layers of RMS norms and projections over d_model = 16, attention over <= 9 keys, d_ff = 32
    # contractions) rounds differently by about half an ulp of its own scale, and independent
    # roundings add like a random walk: ~sqrt(70) / 2 ~ 4 ulps. They are ulps of the magnitudes
    # summed, so of max|logit|, not of each logit: the last contraction turns them into the
    # same absolute error on a logit near 0. Measured: 3.3 ulps with XLA targeting AVX2, 0 with
    # AVX or SSE4.2 (the padding test below: up to 5.9). 16 (~7e-6 here) leaves room for other
    # CPUs and is far below what a wrong layer order or a missing norm does.
    assert_close_to_scale(scan_logits, plain_logits, ulps=16)
    jax.tree.map(np.testing.assert_array_equal, unscan_params(scanned), params)


@pytest.mark.parametrize("policy", ["full", "dots"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_changes_nothing_numerically(policy, scan):
    config = _with(TINY, scan_layers=scan)
    variables, encoder, decoder = _init(config)
    params = nn.unbox(variables["params"])

    def loss(params, config):
        return jnp.mean(T5(config).apply({"params": params}, encoder, decoder) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grads = value_and_grad(params, config)
    remat_value, remat_grads = value_and_grad(params, _with(config, remat_policy=policy))
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)  # A mean of squares: its own scale.
    # Recomputation may fuse the forward differently, so the gradients can differ by a few
    # roundings of each parameter's gradient scale (as in the layout test above; up to 4.2 ulps
    # measured with AVX2, AVX and SSE4.2): 16 ulps of max|gradient| per parameter.
    jax.tree.map(lambda a, b: assert_close_to_scale(a, b, ulps=16), remat_grads, grads)


def test_bfloat16_activations_keep_float32_params_and_track_float32():
    variables, encoder, decoder = _init(TINY)
    params = nn.unbox(variables["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits32 = T5(TINY).apply({"params": params}, encoder, decoder)
    logits16 = T5(_with(TINY, dtype="bfloat16")).apply({"params": params}, encoder, decoder)
    assert logits16.dtype == jnp.float32  # Logits leave the model in float32.
    np.testing.assert_allclose(logits16, logits32, atol=0.1 * float(jnp.abs(logits32).max()))
    assert not np.allclose(logits16, logits32, atol=0)  # Really computed in bfloat16.


def test_dropout_is_active_only_when_enabled():
    config = _with(TINY, dropout_rate=0.3)
    variables, encoder, decoder = _init(config)
    apply = jax.jit(T5(config).apply, static_argnames="enable_dropout")
    off = apply(variables, encoder, decoder)
    again = apply(variables, encoder, decoder)
    on = apply(
        variables, encoder, decoder, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)}
    )
    np.testing.assert_array_equal(off, again)
    assert not np.allclose(on, off)


def test_padding_and_packing_do_not_leak_between_examples():
    """An example's logits are the same alone, padded, or packed next to another example."""
    variables, _, _ = _init(TINY)
    apply = jax.jit(T5(TINY).apply)
    enc_a, dec_a, tgt_a = _tokens(1, (1, 5)), _tokens(2, (1, 4)), _tokens(3, (1, 4))
    enc_b, dec_b, tgt_b = _tokens(4, (1, 3)), _tokens(5, (1, 2)), _tokens(6, (1, 2))
    alone = apply(variables, enc_a, dec_a, tgt_a)
    padded = apply(
        variables,
        jnp.pad(enc_a, ((0, 0), (0, 4))),
        jnp.pad(dec_a, ((0, 0), (0, 3))),
        jnp.pad(tgt_a, ((0, 0), (0, 3))),
    )
    # Padding and packing change the shapes XLA vectorises and the order of the masked sums, so
    # rounding differs as between the layouts above (up to 5.9 ulps of max|logit| measured with
    # AVX2, AVX and SSE4.2): 16 ulps.
    assert_close_to_scale(padded[:, :4], alone, ulps=16)
    packed = apply(
        variables,
        jnp.concatenate([enc_b, enc_a], 1),
        jnp.concatenate([dec_b, dec_a], 1),
        jnp.concatenate([tgt_b, tgt_a], 1),
        encoder_segment_ids=jnp.array([[1] * 3 + [2] * 5]),
        decoder_segment_ids=jnp.array([[1] * 2 + [2] * 4]),
    )
    assert_close_to_scale(packed[:, 2:], alone, ulps=16)


def test_intermediates_and_encoder_heads():
    class MeanPool(nn.Module):
        config: T5Config

        @nn.compact
        def __call__(self, encoder_outputs, deterministic=True):
            pooled = jnp.sum(encoder_outputs.encoded * encoder_outputs.mask[..., None], 1)
            return nn.Dense(3, name="proj")(pooled)

    model = T5(TINY, encoder_heads=(("pool", MeanPool),))
    encoder, decoder = _tokens(0, (2, 9)), _tokens(1, (2, 6))
    variables = model.init(jax.random.PRNGKey(0), encoder, decoder)
    assert "head_pool" in variables["params"]
    logits, intermediates = model.apply(variables, encoder, decoder, return_intermediates=True)
    enc = intermediates["encoder"]
    assert enc.layer_outputs.shape == (2, 2, 9, 16)
    assert enc.embedded.shape == enc.encoded.shape == (2, 9, 16)
    assert intermediates["heads"]["pool"].shape == (2, 3)
    np.testing.assert_array_equal(logits, model.apply(variables, encoder, decoder))
    # The embedded source is the token embedding itself.
    table = nn.unbox(variables["params"])["token_embedder"]["embedding"]
    np.testing.assert_array_equal(enc.embedded, table[encoder])


# Published T5 1.1 sizes (t5x gin files; HF model cards: 77M, 248M, 783M, 2.85B, 11.3B).
PUBLISHED = {
    "small": 76_961_152,
    "base": 247_577_856,
    "large": 783_150_080,
    "xl": 2_849_757_184,
    "xxl": 11_135_332_352,
}


@pytest.mark.parametrize("size", [*PUBLISHED, "tiny"])
def test_gin_model_files_give_published_sizes(size):
    gin.clear_config()
    gin.parse_config_file(os.path.join(GIN_DIR, f"t5_1_1_{size}.gin"))
    config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    gin.clear_config()
    assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings
    tokens = jnp.ones((1, 1), jnp.int32)
    shapes = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), tokens, tokens)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
    if size == "tiny":
        assert count < 2_000_000
    else:
        assert count == PUBLISHED[size]
