"""Shared by the decoding tests: teacher-forced decoding one cached step at a time, and beam
search over a shared source cache against one repeated per beam."""

import jax
import jax.numpy as jnp
import numpy as np
from numerics import assert_close_to_scale

from e2s2_jax import decoding
from e2s2_jax.models.t5 import T5


def cached_decoder_steps(model, params, encoder_tokens, decoder_tokens):
    """Per-step outputs of cached, teacher-forced decoding: `[batch, length, vocab]`."""
    length = decoder_tokens.shape[1]
    encoder_outputs = jax.jit(
        lambda tokens: model.apply({"params": params}, tokens, method=T5.encode)
    )(encoder_tokens)

    @jax.jit
    def step(cache, step_tokens, position):
        variables = {"params": params, **({"cache": cache} if cache is not None else {})}
        logits, updated = model.apply(
            variables,
            encoder_outputs,
            step_tokens[:, None],
            decode=True,
            decode_position=position,
            max_decode_length=length,
            mutable=["cache"],
            method=T5.decode,
        )
        return logits[:, 0], updated["cache"]

    _, cache = jax.jit(lambda t, p: step(None, t, p))(decoder_tokens[:, 0], jnp.int32(0))
    outputs = []
    for position in range(length):
        logits, cache = step(cache, decoder_tokens[:, position], jnp.int32(position))
        outputs.append(logits)
    return jnp.stack(outputs, 1), cache


def uncached_greedy(model, params, encoder_tokens, length):
    """Greedy decoding without a cache, the reference for the cached decoders: the tokens
    `[batch, length]` and each chosen token's log-probability (float64). Each step is one jitted
    full-decoder pass over a `length + 1`-token buffer (one compile): its position i sees
    positions <= i only, so the zeros not yet filled in do not change it."""
    batch = encoder_tokens.shape[0]
    full_decoder = jax.jit(lambda decoder: model.apply({"params": params}, encoder_tokens, decoder))
    decoder = np.zeros((batch, length + 1), np.int32)
    log_probs = np.zeros((batch, length))
    for i in range(length):
        logits = np.asarray(full_decoder(decoder)[:, i], np.float64)
        decoder[:, i + 1] = np.argmax(logits, -1)
        shifted = logits - logits.max(-1, keepdims=True)
        chosen = shifted[np.arange(batch), decoder[:, i + 1]]
        log_probs[:, i] = chosen - np.log(np.exp(shifted).sum(-1))
    return decoder[:, 1:], log_probs


def beam_search_shared_and_repeated(model, params, encoder_tokens, monkeypatch):
    """3-beam search results with the source caches kept once per row (`SHARED_BY_BEAMS`) and
    with every cache leaf repeated per beam; asserts that beams and scores agree."""
    config = decoding.DecodeConfig(
        "beam", max_decode_length=8, num_beams=3, length_penalty=0.6, stop_bound="max_length"
    )
    shared = decoding.make_predict_fn(model, config)(params, encoder_tokens)
    monkeypatch.setattr(decoding, "SHARED_BY_BEAMS", ())
    # A fresh jit (not `make_predict_fn`'s cached one), traced with the patched names.
    repeated = decoding.make_predict_fn.__wrapped__(model, config)(params, encoder_tokens)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    # The two caches give the attention dots other shapes, so XLA may vectorise them
    # differently: a score sums up to 8 (max_decode_length) log-probabilities, each off by a
    # few ulps (~4, as between cached and full decoding in test_decoding) of the logits it came
    # from, which are below max|score| here (~2.3 vs ~4.4): 8 x 4 = 32 ulps of max|score|.
    assert_close_to_scale(shared.scores, repeated.scores, ulps=32)
    return shared, repeated
