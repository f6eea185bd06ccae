"""Shared by the decoding tests: teacher-forced decoding one cached step at a time."""

import jax
import jax.numpy as jnp

from e2s2_jax.models.t5 import T5


def cached_decoder_steps(model, params, encoder_tokens, decoder_tokens):
    """Per-step outputs of cached, teacher-forced decoding: `[batch, length, vocab]`."""
    length = decoder_tokens.shape[1]
    encoder_outputs = model.apply({"params": params}, encoder_tokens, method=T5.encode)

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
