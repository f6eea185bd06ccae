"""E2S2's heads: the denoising head's parameters and dropout, segment pooling against NumPy, and
the heads staying out of Hugging Face export."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale

from e2s2_jax.models import heads
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.t5 import T5, EncoderOutputs

CONFIG = T5Config(
    vocab_size=64,
    d_model=32,
    num_heads=2,
    d_kv=8,
    d_ff=32,
    num_encoder_layers=1,
    num_decoder_layers=1,
)


def encoder_outputs(encoded, mask):
    return EncoderOutputs(encoded=jnp.asarray(encoded), embedded=None, mask=jnp.asarray(mask))


def test_denoising_head_params_and_logits():
    head = heads.DenoisingHead(CONFIG)
    rng = np.random.default_rng(0)
    encoded = rng.normal(size=(3, 5, CONFIG.d_model)).astype(np.float32)
    outputs = encoder_outputs(encoded, np.ones((3, 5), bool))
    variables = head.init(jax.random.key(0), outputs)
    boxed = variables["params"]
    assert nn.get_partition_spec(boxed) == {
        "kernel": jax.sharding.PartitionSpec("embed", "noise_classes"),
        "bias": jax.sharding.PartitionSpec("noise_classes"),
    }
    params = nn.unbox(boxed)
    assert params["kernel"].shape == (CONFIG.d_model, 3)
    assert np.all(params["bias"] == 0)

    params = {"kernel": params["kernel"], "bias": jnp.asarray([0.1, -0.2, 0.3])}
    logits = head.apply({"params": params}, outputs)
    expected = encoded @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    assert logits.shape == (3, 5, 3) and logits.dtype == jnp.float32
    # XLA's dot and NumPy's float32 matmul sum the d_model = 32 products in different orders:
    # ~sqrt(32) / 2 ~ 3 roundings of the products' magnitude typically, 31 at worst; 16 ulps
    # of max|logit|, which a logit near 0 (cancelling products) needs as much as the largest.
    assert_close_to_scale(logits, expected, ulps=16)

    # Dropout 0.1 only when not deterministic.
    dropped = head.apply(
        {"params": params}, outputs, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(np.asarray(dropped), expected, atol=1e-4)


def test_denoising_head_init_scale():
    big = T5Config(d_model=512)
    outputs = encoder_outputs(np.zeros((1, 1, 512), np.float32), np.ones((1, 1), bool))
    kernel = nn.unbox(heads.DenoisingHead(big).init(jax.random.key(0), outputs))["params"]["kernel"]
    assert abs(float(jnp.std(kernel)) - 0.02) < 0.002


def numpy_segment_pool(encoded, mask, segment_ids, max_segments):
    batch, _, embed = encoded.shape
    pooled = np.zeros((batch, max_segments, embed))
    valid = np.zeros((batch, max_segments), bool)
    for row in range(batch):
        for slot in range(max_segments):
            positions = [
                i
                for i in range(encoded.shape[1])
                if mask[row, i] and (segment_ids is None or segment_ids[row, i] == slot + 1)
            ]
            if segment_ids is None and slot > 0:
                positions = []
            if positions:
                mean = encoded[row, positions].mean(axis=0)
                pooled[row, slot] = mean / np.linalg.norm(mean)
                valid[row, slot] = True
    return pooled, valid


def test_pooling_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(1)
    segment_ids = np.array(
        [[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 0, 0, 0, 0]], np.int32
    )
    mask = segment_ids > 0
    encoded = rng.normal(size=(3, 8, 4)).astype(np.float32)
    encoded[~mask] = 1e3  # padded positions hold garbage
    outputs = encoder_outputs(encoded, mask)
    pooled, valid = heads.contrastive_embeddings(outputs, jnp.asarray(segment_ids), 4)
    ref_pooled, ref_valid = numpy_segment_pool(encoded, mask, segment_ids, 4)
    np.testing.assert_array_equal(np.asarray(valid), ref_valid)
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, rtol=1e-5, atol=1e-6)
    assert int(valid.sum()) == 6

    # Unpacked rows: one example per row, padding ignored.
    pooled, valid = heads.contrastive_embeddings(outputs, None, 2)
    ref_pooled, ref_valid = numpy_segment_pool(encoded, mask, None, 2)
    np.testing.assert_array_equal(np.asarray(valid), ref_valid)
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, rtol=1e-5, atol=1e-6)

    # Segments past the slots are counted as dropped.
    assert float(heads.dropped_segments(jnp.asarray(mask), jnp.asarray(segment_ids), 2)) == 1.0
    assert float(heads.dropped_segments(jnp.asarray(mask), jnp.asarray(segment_ids), 3)) == 0.0


def test_heads_in_t5_and_dropped_by_hf_export(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    from e2s2_jax.interop import hf

    model = T5(CONFIG, encoder_heads=(("denoise", heads.DenoisingHead),))
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 64, (2, 6)), jnp.int32)
    variables = model.init(jax.random.key(0), tokens, tokens)
    params = nn.unbox(variables["params"])
    assert set(params["head_denoise"]) == {"kernel", "bias"}
    logits, intermediates = model.apply(
        {"params": params}, tokens, tokens, return_intermediates=True
    )
    noise_logits = intermediates["heads"]["denoise"]
    expected = np.asarray(intermediates["encoder"].encoded) @ np.asarray(
        params["head_denoise"]["kernel"]
    )
    assert_close_to_scale(noise_logits, expected, ulps=16)  # As in the head's own test above.

    hf.export_hf(CONFIG, params, str(tmp_path))
    tensors = safetensors.load_file(str(tmp_path / hf.WEIGHTS_FILE))
    assert not any("head" in name and "lm_head" not in name for name in tensors)
    # The exported model is the same T5 without the head.
    _, reimported = hf.import_hf(str(tmp_path))
    plain_params = {k: v for k, v in params.items() if k != "head_denoise"}
    assert jax.tree.structure(reimported) == jax.tree.structure(plain_params)
    plain_logits = T5(CONFIG).apply({"params": reimported}, tokens, tokens)
    # The same weights through a program without the head, which XLA may fuse differently:
    # rounding as between test_t5's layouts (a few ulps of max|logit|), so 16 ulps.
    assert_close_to_scale(plain_logits, logits, ulps=16)
