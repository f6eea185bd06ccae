"""Autoregressive decoding with a KV cache: greedy, beam search, temperature/top-k/top-p sampling.

The algorithms only see `tokens_to_logits(tokens [n], cache, step) -> (logits [n, vocab], cache)`
and a `reorder_cache(cache, indices [n])`; `predict_batch` wires them to a `T5` model.
Returned tokens exclude the decoder start token; positions after eos hold `pad_id`.

The model's outputs are logits, scored with `log_softmax` (`normalize=True`), or, with a
SurfaceFusion "hard" or "gate" output layer (`models/fusion.py`, `fusion.scores_used_as_is`),
fused log-probability scores used as is (`normalize=False`), as the reference's beam search
does and as the training loss uses them: beam search ranks by and sums the fused score,
greedy and sampling report it per token (greedy's argmax is the same either way; sampling
draws from `exp(score)` normalised, after temperature and filtering, as from logits). The
"soft" and "postnorm" scores are normalised already: `log_softmax` leaves them as they are.
`SurfaceFusion.renormalize = True` scores "hard"/"gate" with `log_softmax(fused)` instead. The
source keys and values of the surface attention are cached once per decode, like
cross-attention's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from e2s2_jax.models.attention import CROSS_ATTENTION_CACHE
from e2s2_jax.models.config import NEG_INF
from e2s2_jax.models.fusion import SURFACE_ATTENTION_CACHE, scores_used_as_is
from e2s2_jax.models.t5 import T5, EncoderOutputs

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache, Array], tuple[Array, Cache]]
ReorderCache = Callable[[Cache, Array], Cache]


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """tokens: `[batch, length]` (greedy, sampling) or `[batch, beams, length]` (beam search,
    best first). scores: `[batch]` sum of token log-probabilities (greedy, sampling) or
    `[batch, beams]` length-normalised beam scores. token_log_probs: `[batch, length]` model
    log-probability of each chosen token (0 after eos); None for beam search. With
    `normalize=False` the "log-probabilities" are the model's scores as is (SurfaceFusion's
    fused score)."""

    tokens: Array
    scores: Array
    token_log_probs: Array | None = None


jax.tree_util.register_dataclass(
    DecodeResult, data_fields=["tokens", "scores", "token_log_probs"], meta_fields=[]
)


def _filter_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """Temperature, then top-k, then nucleus (top-p) filtering, as Hugging Face orders them."""
    logits = logits / temperature
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, NEG_INF, logits)
    if top_p < 1.0:
        logits = jnp.where(_nucleus(logits, top_p), logits, NEG_INF)
    return logits


def _order_key(x: Array) -> Array:
    """int32 keys that order as the float32 values `x` do (sign-magnitude bits to two's
    complement)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _nucleus(logits: Array, top_p: float) -> Array:
    """The top-p support: the smallest set of the most likely tokens whose mass reaches
    `top_p` (ties at its edge kept; always at least the top token), as a bool mask.

    A token is kept iff the mass of the tokens strictly more likely than it is below `top_p`.
    That mass only falls as the logit grows, so the edge is found by bisection over the
    logits' order keys (32 halvings of the int32 range: exact), each a masked sum over the
    vocabulary, instead of sorting the vocabulary at every step (70 ms per step at 32 x 8192
    on 2 CPU cores; the bisection takes a few)."""
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_key(logits)
    # Invariant: mass(keys > lo) >= top_p > mass(keys > hi); lo < hi.
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        below = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return keys > lo


def _sample(rng: Array, logits: Array) -> Array:
    """One token per row drawn from `softmax(logits)` by inverting its CDF with one uniform
    number per row: the first token whose cumulative mass exceeds `u` times the total.

    The threshold is kept strictly below the total (`u < 1`, but `u * total` could round up to
    it), so some token exceeds it, and the first that does has mass (its cumulative sum grew):
    tokens filtered to NEG_INF are never drawn. (`jax.random.categorical`, Gumbel-max, draws a
    random number for every vocabulary entry: 3.9 ms at 32 x 8192 on 2 CPU cores, against
    0.9 ms for this.)"""
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(rng, (*logits.shape[:-1], 1), cdf.dtype)
    total = cdf[..., -1:]
    threshold = jnp.minimum(u * total, jnp.nextafter(total, 0))
    return jnp.sum(cdf <= threshold, axis=-1)


def _log_probs(outputs: Array, normalize: bool) -> Array:
    """float32 per-token log-probabilities: `log_softmax(outputs)`, or `outputs` as is."""
    outputs = outputs.astype(jnp.float32)
    return jax.nn.log_softmax(outputs, axis=-1) if normalize else outputs


def sample_or_greedy(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    batch_size: int,
    max_decode_length: int,
    *,
    start_id: int = 0,
    eos_id: int = 1,
    pad_id: int = 0,
    rng: Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    normalize: bool = True,
) -> DecodeResult:
    """Greedy decoding when `rng` is None, else sampling from the filtered distribution.

    Stops early when every row has produced eos. Scores are the model's own log-probabilities
    (before temperature and filtering), so they are comparable across settings:
    `log_softmax(logits)`, or with `normalize=False` the model's outputs as is (log-probability
    scores such as SurfaceFusion's, which need not be normalised). The draw is from the
    filtered `softmax(outputs / temperature)` either way.
    """

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_decode_length) & ~jnp.all(done)

    def body(state):
        step, last_tokens, tokens, log_probs_out, done, cache, rng = state
        logits, cache = tokens_to_logits(last_tokens, cache, step)
        log_probs = _log_probs(logits, normalize)
        if rng is None:
            next_tokens = jnp.argmax(logits, axis=-1)
        else:
            rng, step_rng = jax.random.split(rng)
            filtered = _filter_logits(logits.astype(jnp.float32), temperature, top_k, top_p)
            next_tokens = _sample(step_rng, filtered)
        next_tokens = jnp.where(done, pad_id, next_tokens).astype(jnp.int32)
        chosen = jnp.take_along_axis(log_probs, next_tokens[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, step].set(next_tokens)
        log_probs_out = log_probs_out.at[:, step].set(jnp.where(done, 0.0, chosen))
        done = done | (next_tokens == eos_id)
        return step + 1, next_tokens, tokens, log_probs_out, done, cache, rng

    init = (
        jnp.array(0, jnp.int32),
        jnp.full((batch_size,), start_id, jnp.int32),
        jnp.full((batch_size, max_decode_length), pad_id, jnp.int32),
        jnp.zeros((batch_size, max_decode_length), jnp.float32),
        jnp.zeros((batch_size,), bool),
        cache,
        rng,
    )
    _, _, tokens, token_log_probs, _, _, _ = jax.lax.while_loop(cond, body, init)
    return DecodeResult(tokens, token_log_probs.sum(-1), token_log_probs)


def beam_search(
    tokens_to_logits: TokensToLogits,
    reorder_cache: ReorderCache,
    cache: Cache,
    batch_size: int,
    num_beams: int,
    max_decode_length: int,
    *,
    start_id: int = 0,
    eos_id: int = 1,
    pad_id: int = 0,
    length_penalty: float = 1.0,
    stop_bound: str = "current_length",
    normalize: bool = True,
) -> DecodeResult:
    """Beam search over a cache laid out `[batch * num_beams, ...]` (beams of a row adjacent).

    A token's log-probability is `log_softmax(logits)`, or with `normalize=False` the model's
    output as is (SurfaceFusion's fused score, as the reference's beam search uses it): beams
    are ranked by, and scored with, the sum of those.

    Hugging Face's algorithm, so that the same model gives the same beams: each step keeps
    the 2k best continuations, finished ones (eos, or the last step) enter the finished pool
    scored `sum_log_probs / generated_length ** length_penalty` (eos counted), the k best
    unfinished ones continue. A row stops when its best running beam cannot beat its worst
    finished one: `stop_bound="current_length"` is HF's default bound (a heuristic when
    length_penalty > 0), `"max_length"` the exact one (HF's `early_stopping="never"`).
    """
    if stop_bound not in ("current_length", "max_length"):
        raise ValueError(f"stop_bound={stop_bound!r}: use 'current_length' or 'max_length'.")
    k, length = num_beams, max_decode_length
    candidates = 2 * k

    def gather(x, indices):  # x: [batch, beams, ...], indices: [batch, n]
        return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), 1)

    def body(state):
        (
            step,
            running_seqs,
            running_scores,
            finished_seqs,
            finished_scores,
            finished_flags,
            open_rows,
            cache,
        ) = state
        last_tokens = jnp.where(
            step == 0, start_id, running_seqs[:, :, jnp.maximum(step - 1, 0)]
        ).reshape(-1)
        logits, cache = tokens_to_logits(last_tokens.astype(jnp.int32), cache, step)
        log_probs = _log_probs(logits, normalize)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch_size, k, vocab) + running_scores[:, :, None]
        top_scores, top_indices = jax.lax.top_k(
            log_probs.reshape(batch_size, k * vocab), candidates
        )
        top_beams, top_tokens = top_indices // vocab, top_indices % vocab
        top_seqs = gather(running_seqs, top_beams).at[:, :, step].set(top_tokens)
        is_last_step = step == length - 1
        hits_stop = (top_tokens == eos_id) | is_last_step

        # Unfinished candidates continue: the k best.
        continuing = top_scores + hits_stop * NEG_INF
        keep = jax.lax.top_k(continuing, k)[1]
        next_running_seqs = gather(top_seqs, keep)
        next_running_scores = gather(continuing, keep)
        cache = reorder_cache(
            cache, (gather(top_beams, keep) + jnp.arange(batch_size)[:, None] * k).reshape(-1)
        )

        # Finished candidates among the top k enter the pool, length-normalised.
        normalised = top_scores / (step + 1.0) ** length_penalty
        newly_finished = hits_stop & (jnp.arange(candidates) < k)[None, :]
        normalised = jnp.where(newly_finished & open_rows[:, None], normalised, 2 * NEG_INF)
        merged_scores = jnp.concatenate([finished_scores, normalised], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        finished_seqs = gather(jnp.concatenate([finished_seqs, top_seqs], axis=1), best)
        finished_scores = gather(merged_scores, best)
        finished_flags = gather(jnp.concatenate([finished_flags, newly_finished], axis=1), best)

        # Can a running beam still beat the worst finished one?
        bound_length = length if stop_bound == "max_length" and length_penalty > 0 else step + 1.0
        best_possible = next_running_scores[:, 0] / bound_length**length_penalty
        worst_finished = jnp.where(finished_flags, finished_scores, NEG_INF)
        open_rows = open_rows & jnp.any(best_possible[:, None] > worst_finished, axis=1)
        return (
            step + 1,
            next_running_seqs,
            next_running_scores,
            finished_seqs,
            finished_scores,
            finished_flags,
            open_rows,
            cache,
        )

    def cond(state):
        step, open_rows = state[0], state[6]
        return (step < length) & jnp.any(open_rows)

    running_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch_size, 1))
    init = (
        jnp.array(0, jnp.int32),
        jnp.full((batch_size, k, length), pad_id, jnp.int32),
        running_scores,
        jnp.full((batch_size, k, length), pad_id, jnp.int32),
        jnp.full((batch_size, k), 2 * NEG_INF),
        jnp.zeros((batch_size, k), bool),
        jnp.ones((batch_size,), bool),
        cache,
    )
    state = jax.lax.while_loop(cond, body, init)
    return DecodeResult(tokens=state[3], scores=state[4])


# ----------------------------------------------------------------------------- T5 glue


def reorder_t5_cache(cache: Cache, indices: Array) -> Cache:
    """Gathers self-attention caches along their batch axis (second to the heads/kv/length
    triple, so it works with and without a leading scanned-layer axis); cross-attention caches
    (and SurfaceFusion's `source_key`/`source_value`) are identical across the beams of a row
    and are left alone."""

    def reorder(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "cached_" not in name:
            return leaf
        return jnp.take(leaf, indices, axis=leaf.ndim - 4, mode="clip")

    return jax.tree_util.tree_map_with_path(reorder, cache)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode. method: "greedy", "beam" or "sample"."""

    method: str = "greedy"
    max_decode_length: int = 64
    num_beams: int = 4
    length_penalty: float = 1.0
    stop_bound: str = "current_length"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.method not in ("greedy", "beam", "sample"):
            raise ValueError(f"DecodeConfig.method={self.method!r}: use greedy, beam or sample.")
        if self.max_decode_length < 1:
            raise ValueError("DecodeConfig.max_decode_length must be at least 1.")
        if self.temperature <= 0:
            raise ValueError("DecodeConfig.temperature must be > 0 (use method='greedy' for 0).")


def _repeat_rows(tree, times: int):
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), tree)


# Cache leaves the beams of a row share unrepeated: attention groups the beams' queries over
# them (`models/attention.py: group_rows`, and SurfaceFusion's surface attention).
SHARED_BY_BEAMS = CROSS_ATTENTION_CACHE + SURFACE_ATTENTION_CACHE


def _repeat_cache_rows(cache: Cache, repeated_shapes: Cache, times: int) -> Cache:
    """Repeats each leaf `times` along its batch axis, the one axis where its shape differs
    from `repeated_shapes` (the same cache made for `times` as many rows); leaves without a
    batch axis, and the `SHARED_BY_BEAMS` ones, stay as they are. Rows of a batch element end
    adjacent, as in `_repeat_rows`."""

    def repeat(path, leaf, target):
        if getattr(path[-1], "key", None) in SHARED_BY_BEAMS:
            return leaf
        axes = [i for i, (a, b) in enumerate(zip(leaf.shape, target.shape, strict=True)) if a != b]
        return jnp.repeat(leaf, times, axis=axes[0]) if axes else leaf

    return jax.tree_util.tree_map_with_path(repeat, cache, repeated_shapes)


def predict_batch(
    model: T5,
    params,
    encoder_input_tokens: Array,
    decode_config: DecodeConfig,
    rng: Array | None = None,
) -> DecodeResult:
    """Encodes `[batch, length]` tokens once and decodes with a KV cache. Jit it with `model`
    and `decode_config` static (see `make_predict_fn`)."""
    cfg = model.config
    config = decode_config
    encoder_outputs: EncoderOutputs = model.apply(
        {"params": params}, encoder_input_tokens, method=T5.encode
    )
    rows = 1 if config.method != "beam" else config.num_beams
    batch_size = encoder_input_tokens.shape[0]
    decode_kwargs = dict(
        decode=True, max_decode_length=config.max_decode_length, method=T5.decode, mutable=["cache"]
    )

    def step_over(encoder_outputs: EncoderOutputs) -> TokensToLogits:
        def tokens_to_logits(tokens, cache, step):
            variables = {"params": params} if cache is None else {"params": params, "cache": cache}
            logits, updated = model.apply(
                variables, encoder_outputs, tokens[:, None], decode_position=step, **decode_kwargs
            )
            return logits[:, 0], updated["cache"]

        return tokens_to_logits

    # The first call creates the cache (and the cross-attention keys/values); its dummy
    # step 0 is overwritten by the real one. Beams of a row share the keys and values over
    # the source (cross-attention's, SurfaceFusion's): they are projected and kept once per
    # row (`SHARED_BY_BEAMS`); the rest of the cache is repeated for the beams.
    dummy = jnp.full((batch_size,), cfg.decoder_start_id, jnp.int32)
    start = jnp.array(0, jnp.int32)
    _, cache = step_over(encoder_outputs)(dummy, None, start)
    if rows > 1:
        encoder_outputs = _repeat_rows(encoder_outputs, rows)
        repeated_shapes = jax.eval_shape(
            lambda: step_over(encoder_outputs)(jnp.repeat(dummy, rows), None, start)[1]
        )
        cache = _repeat_cache_rows(cache, repeated_shapes, rows)
    tokens_to_logits = step_over(encoder_outputs)
    ids = dict(start_id=cfg.decoder_start_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id)
    # SurfaceFusion "hard"/"gate": rank by the fused score as is (METHODS.md section 3).
    normalize = not scores_used_as_is(model)
    if config.method == "beam":
        return beam_search(
            tokens_to_logits,
            reorder_t5_cache,
            cache,
            batch_size,
            config.num_beams,
            config.max_decode_length,
            length_penalty=config.length_penalty,
            stop_bound=config.stop_bound,
            normalize=normalize,
            **ids,
        )
    if config.method == "sample" and rng is None:
        raise ValueError("Sampling needs an rng.")
    return sample_or_greedy(
        tokens_to_logits,
        cache,
        batch_size,
        config.max_decode_length,
        rng=rng if config.method == "sample" else None,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        normalize=normalize,
        **ids,
    )


@functools.lru_cache(maxsize=32)
def make_predict_fn(model: T5, decode_config: DecodeConfig) -> Callable[..., DecodeResult]:
    """A jitted `(params, encoder_input_tokens, rng=None) -> DecodeResult`."""

    def predict(params, encoder_input_tokens, rng=None):
        return predict_batch(model, params, encoder_input_tokens, decode_config, rng)

    return jax.jit(predict)
