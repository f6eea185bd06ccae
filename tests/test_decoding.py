"""Decoding: the KV cache against full re-decoding, and the sampling filters against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import beam_search_shared_and_repeated, cached_decoder_steps, uncached_greedy
from flax import linen as nn
from numerics import assert_close_to_scale

from e2s2_jax import decoding
from e2s2_jax.decoding import DecodeConfig, _filter_logits, make_predict_fn, sample_or_greedy
from e2s2_jax.models.attention import group_rows, ungroup_rows
from e2s2_jax.models.config import NEG_INF, T5Config
from e2s2_jax.models.t5 import T5

TINY = T5Config(
    vocab_size=50,
    d_model=32,
    num_heads=4,
    d_kv=8,
    d_ff=64,
    num_encoder_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
)


def _setup(scan: bool, seed: int = 0):
    config = T5Config(**{**TINY.__dict__, "scan_layers": scan})
    encoder_tokens = np.random.RandomState(seed).randint(2, 50, (3, 11)).astype(np.int32)
    encoder_tokens[1, 6:] = 0
    model = T5(config)
    params = nn.unbox(
        model.init(jax.random.PRNGKey(seed), encoder_tokens, encoder_tokens[:, :4])["params"]
    )
    return model, params, jnp.asarray(encoder_tokens)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_step_logits_equal_full_decoder_logits(scan):
    """Teacher-forced: each cached step's logits equal the full decoder pass at that position."""
    model, params, encoder_tokens = _setup(scan)
    length = 16  # Longer than max_distance, so far-away buckets are used.
    decoder_tokens = jnp.asarray(np.random.RandomState(1).randint(2, 50, (3, length)), jnp.int32)
    decoder_tokens = decoder_tokens.at[:, 0].set(0)
    full = jax.jit(model.apply)({"params": params}, encoder_tokens, decoder_tokens)

    steps, _ = cached_decoder_steps(model, params, encoder_tokens, decoder_tokens)
    for position in range(length):
        logits = steps[:, position]
        # One cached step against the full pass: the same sums grouped otherwise (measured
        # 4.2 ulps under AVX2), so 16 float32 ulps of the logits' scale (tests/numerics.py).
        assert_close_to_scale(logits, full[:, position], ulps=16)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_uncached_greedy(scan):
    model, params, encoder_tokens = _setup(scan, seed=2)
    length = 9
    result = make_predict_fn(model, DecodeConfig("greedy", max_decode_length=length))(
        params, encoder_tokens
    )
    reference, log_probs = uncached_greedy(model, params, encoder_tokens, length)
    ended = np.cumsum(np.cumsum(reference == 1, 1), 1) > 1  # After the first eos.
    np.testing.assert_array_equal(result.tokens, np.where(ended, 0, reference))
    np.testing.assert_allclose(result.scores, np.where(ended, 0, log_probs).sum(1), rtol=1e-5)


def test_beam_search_best_beam_is_at_least_as_good_as_greedy():
    model, params, encoder_tokens = _setup(False, seed=3)
    greedy = make_predict_fn(model, DecodeConfig("greedy", max_decode_length=8))(
        params, encoder_tokens
    )
    beam = make_predict_fn(
        model,
        DecodeConfig(
            "beam", max_decode_length=8, num_beams=4, length_penalty=0.0, stop_bound="max_length"
        ),
    )(params, encoder_tokens)
    assert beam.tokens.shape == (3, 4, 8)
    assert np.all(np.diff(np.asarray(beam.scores), axis=1) <= 0)  # Best first.
    # With no length penalty a beam score is a sum of log-probs: exact search beats greedy.
    assert np.all(np.asarray(beam.scores[:, 0]) >= np.asarray(greedy.scores) - 1e-5)


def _numpy_filter(logits, temperature, top_k, top_p):
    """Reference: the set of token ids that may be sampled, row by row."""
    allowed = []
    for row in logits / temperature:
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        probs = np.exp(row[keep] - row[keep].max())
        probs /= probs.sum()
        mass_before = np.cumsum(probs) - probs
        allowed.append(set(keep[mass_before < top_p].tolist()))
    return allowed


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 8, 0.5), (1.0, 0, 0.01)]
)
def test_filter_keeps_exactly_the_reference_support(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(16, 40).astype(np.float32) * 2
    filtered = np.asarray(_filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    reference = _numpy_filter(logits, temperature, top_k, top_p)
    for row, allowed in zip(filtered, reference, strict=True):
        assert set(np.flatnonzero(row > -1e8).tolist()) == allowed


@pytest.mark.parametrize("top_p", [0.9, 0.3, 0.999])
def test_nucleus_bisection_matches_the_sorted_reference_on_a_real_vocabulary(top_p):
    """8192 logits per row, flat to peaked, one row mostly masked to NEG_INF (as after top-k).
    The reference sorts in float64; a token may differ only where the mass before it is within
    float32 rounding of `top_p` (summed over thousands of tokens, the two orders differ)."""
    rng = np.random.RandomState(1)
    logits = (rng.randn(6, 8192) * np.array([[0.5], [1], [2], [4], [8], [1]])).astype(np.float32)
    logits[5, 100:] = -1e9
    filtered = np.asarray(_filter_logits(jnp.asarray(logits), 1.0, 0, top_p))
    for row, kept in zip(logits.astype(np.float64), filtered > -1e8, strict=True):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-row, kind="stable")
        mass_before = np.empty_like(probs)
        mass_before[order] = np.cumsum(probs[order]) - probs[order]
        differs = kept != (mass_before < top_p)
        assert kept[order[0]]
        assert np.all(np.abs(mass_before[differs] - top_p) < 1e-5), mass_before[differs]
        assert differs.sum() <= 2


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))

    def tokens_to_logits(tokens, cache, step):
        return jnp.broadcast_to(logits, (tokens.shape[0], 4)), cache

    draws = 20000
    result = jax.jit(
        lambda rng: sample_or_greedy(
            tokens_to_logits, None, draws, 1, rng=rng, eos_id=99, top_p=0.75
        )
    )(jax.random.PRNGKey(0))
    frequencies = np.bincount(np.asarray(result.tokens[:, 0]), minlength=4) / draws
    # top_p=0.75 keeps {0, 1} (0.5 + 0.3 >= 0.75), renormalised to 0.625 / 0.375.
    np.testing.assert_allclose(frequencies, [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(
        result.token_log_probs[:, 0], np.log([0.5, 0.3, 0.15, 0.05])[result.tokens[:, 0]], rtol=1e-5
    )


def test_sampling_is_deterministic_per_rng_and_top_k_1_is_greedy():
    model, params, encoder_tokens = _setup(False, seed=4)
    sample = make_predict_fn(model, DecodeConfig("sample", max_decode_length=6, temperature=1.5))
    first = sample(params, encoder_tokens, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(
        first.tokens, sample(params, encoder_tokens, jax.random.PRNGKey(7)).tokens
    )
    greedy = make_predict_fn(model, DecodeConfig("greedy", max_decode_length=6))(
        params, encoder_tokens
    )
    top1 = make_predict_fn(model, DecodeConfig("sample", max_decode_length=6, top_k=1))(
        params, encoder_tokens, jax.random.PRNGKey(3)
    )
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_bad_decode_config_is_rejected():
    with pytest.raises(ValueError, match="method"):
        DecodeConfig("nucleus")
    with pytest.raises(ValueError, match="temperature"):
        DecodeConfig("sample", temperature=0.0)


def test_group_rows_makes_each_rows_beams_its_query_positions():
    x = np.arange(6 * 2 * 3 * 4, dtype=np.float32).reshape(6, 2, 3, 4)  # 2 rows x 3 beams
    grouped = np.asarray(group_rows(jnp.asarray(x), 3))
    assert grouped.shape == (2, 2, 9, 4)
    for row, beam, head, q in np.ndindex(2, 3, 2, 3):
        np.testing.assert_array_equal(grouped[row, head, beam * 3 + q], x[row * 3 + beam, head, q])
    np.testing.assert_array_equal(ungroup_rows(jnp.asarray(grouped), 3), x)


@pytest.mark.parametrize("scan", [False, True])
def test_beam_search_on_shared_cross_attention_cache_equals_repeated_cache(scan, monkeypatch):
    """Beams of a row attend one copy of its cross-attention keys/values; the beams and scores
    equal those of the plain attention over a copy per beam."""
    model, params, encoder_tokens = _setup(scan, seed=4)
    beam_search_shared_and_repeated(model, params, encoder_tokens, monkeypatch)


def test_beam_cache_keeps_cross_attention_once_per_row():
    cache = {
        "layers_0": {
            "encoder_decoder_attention": {"cross_key": jnp.zeros((2, 4, 11, 8))},
            "self_attention": {"cached_key": jnp.zeros((2, 4, 8, 8))},
        }
    }
    repeated_shapes = jax.tree.map(lambda x: jnp.zeros((6, *x.shape[1:])), cache)
    out = decoding._repeat_cache_rows(cache, repeated_shapes, 3)
    assert out["layers_0"]["encoder_decoder_attention"]["cross_key"].shape == (2, 4, 11, 8)
    assert out["layers_0"]["self_attention"]["cached_key"].shape == (6, 4, 8, 8)


def test_inverse_cdf_sampler_follows_the_probabilities_and_skips_masked_tokens():
    """`_sample` against the closed-form softmax: 200k draws over 50 tokens, 10 of them
    masked to NEG_INF (never drawn), each frequency within 5 binomial standard deviations."""
    from e2s2_jax.decoding import _sample

    rng = np.random.RandomState(2)
    logits = (rng.randn(50) * 2).astype(np.float32)
    masked = rng.choice(50, 10, replace=False)
    logits[masked] = NEG_INF
    draws = 200_000
    tokens = jax.jit(_sample)(jax.random.PRNGKey(5), jnp.broadcast_to(logits, (draws, 50)))
    counts = np.bincount(np.asarray(tokens), minlength=50)
    assert counts.shape == (50,) and counts[masked].sum() == 0
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs[masked] = 0
    probs /= probs.sum()
    sigma = np.sqrt(draws * probs * (1 - probs))
    assert np.all(np.abs(counts - draws * probs) <= 5 * sigma + 1), counts - draws * probs


@pytest.mark.parametrize("u,expected", [(0.0, 1), (1.0, 3)])
def test_inverse_cdf_sampler_edges_draw_the_first_and_last_token_with_mass(
    monkeypatch, u, expected
):
    """At u = 0 the first token with mass; at u = 1 (beyond `uniform`'s range, where
    `u * total` equals the total) still the last token with mass, never a masked one or an
    id past the vocabulary."""
    from e2s2_jax import decoding

    monkeypatch.setattr(
        decoding.jax.random, "uniform", lambda rng, shape, dtype: jnp.full(shape, u, dtype)
    )
    logits = jnp.asarray([[NEG_INF, 0.5, -1.0, 2.0, NEG_INF]] * 2)
    tokens = decoding._sample(jax.random.PRNGKey(0), logits)
    np.testing.assert_array_equal(np.asarray(tokens), [expected, expected])


def markov_scores(seed: int, length: int = 3, vocab: int = 4):
    """Per-step scores `[length, vocab (previous token), vocab]` of a chain whose step-t scores
    depend on the previous token only (start id 0). Unnormalised like SurfaceFusion's hard
    fusion: `log_softmax(x) - c` with `c >= 0` per (step, previous token), so each row's `exp`
    sums to at most 1. Token 0 (pad) is never chosen."""
    rng = np.random.RandomState(seed)
    x = rng.randn(length, vocab, vocab) * 1.5
    x[..., 0] = -1e4
    log_probs = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_probs -= x.max(-1, keepdims=True)
    return (log_probs - rng.uniform(0, 2, (length, vocab, 1))).astype(np.float32)


def exhaustive_best(scores, eos_id: int = 1):
    """The best sequence (ending at eos, or at the length limit) by the summed scores, and the
    sum of any sequence, by enumeration (float64)."""
    import itertools

    length, vocab = scores.shape[0], scores.shape[-1]

    def total(seq):
        previous, value = 0, 0.0
        for step, token in enumerate(seq):
            value += float(scores[step, previous, token])
            previous = token
        return value

    candidates = [
        seq
        for n in range(1, length + 1)
        for seq in itertools.product(range(1, vocab), repeat=n)
        if (seq[-1] == eos_id or n == length) and eos_id not in seq[:-1]
    ]
    return max(candidates, key=total), total


def test_beam_search_and_greedy_rank_by_unnormalised_scores_as_is():
    """`normalize=False` (SurfaceFusion hard/gate): beam search returns the sequence with the
    best sum of the scores as is (found by enumeration; 8 beams keep every prefix, so the
    search is exact) and that sum as its score; `normalize=True` the best by the sum of their
    log_softmax, a different sequence here (the per-prefix offsets `c` change the ranking).
    Greedy and sampling report the raw score of each chosen token. Tolerance: 4 float32 ulps of
    the summed magnitudes (3 terms)."""
    raw = markov_scores(seed=17)  # Best: (2, eos) as is, (3, 2, eos) renormalised.
    normalized = raw - np.log(np.exp(raw.astype(np.float64)).sum(-1, keepdims=True))
    eps32 = np.finfo(np.float32).eps

    def tokens_to_logits(table):
        table = jnp.asarray(table)
        return lambda tokens, cache, step: (table[step, tokens], cache)

    bests = {}
    for normalize, reference in ((False, raw), (True, normalized)):
        result = decoding.beam_search(
            tokens_to_logits(raw),
            lambda cache, indices: cache,
            None,
            batch_size=1,
            num_beams=8,
            max_decode_length=3,
            length_penalty=0.0,
            stop_bound="max_length",
            normalize=normalize,
        )
        best, total = exhaustive_best(reference)
        bests[normalize] = best
        assert tuple(t for t in np.asarray(result.tokens[0, 0]) if t) == best
        tol = 4 * eps32 * np.abs(reference[..., 1:]).max() * 3
        np.testing.assert_allclose(float(result.scores[0, 0]), total(best), rtol=0, atol=tol)
        for beam, score in zip(
            np.asarray(result.tokens[0]), np.asarray(result.scores[0]), strict=True
        ):
            if score > -1e8:  # A finished beam: its score is its tokens' summed score.
                seq = tuple(t for t in beam if t)
                np.testing.assert_allclose(score, total(seq), rtol=0, atol=tol)
    assert bests[False] != bests[True]

    for rng in (None, jax.random.PRNGKey(0)):
        result = sample_or_greedy(tokens_to_logits(raw), None, 4, 3, rng=rng, normalize=False)
        tokens = np.asarray(result.tokens)
        previous = np.concatenate([np.zeros((4, 1), int), tokens[:, :-1]], 1)
        expected = raw[np.arange(3)[None], previous, tokens]
        after_eos = np.cumsum(np.cumsum(tokens == 1, 1), 1) > 1
        np.testing.assert_array_equal(result.token_log_probs, np.where(after_eos, 0, expected))
