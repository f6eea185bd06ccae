"""Word-level span sampling for SSR and the text shapes of its records (METHODS.md section 2).

Words are runs of letters/digits (with inner apostrophes) or single punctuation marks; spans are
`[start, end)` word ranges, so they map back to exact character ranges of the original text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# A word: letters/digits with inner apostrophes ("John's"), or one punctuation mark.
WORD_PATTERN = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*|[^\w\s]|_+")
SPANS_PER_WORD = 0.075
MEAN_SPAN_WORDS = 3.0


def sentinel(index: int) -> str:
    """The text form of sentinel `index` (`<extra_id_index>`)."""
    return f"<extra_id_{index}>"


def word_offsets(text: str) -> np.ndarray:
    """Returns `[n_words, 2]` int64 character offsets `[start, end)` of `text`'s words."""
    offsets = [match.span() for match in WORD_PATTERN.finditer(text)]
    return np.asarray(offsets, np.int64).reshape(-1, 2)


def example_rng(seed: int, example_id: int) -> np.random.Generator:
    """A Generator that depends only on (seed, example_id): the spans of an example do not
    depend on which process or batch handles it, or on a resume."""
    return np.random.default_rng([seed, example_id])


def sample_word_spans(num_words: int, rng: np.random.Generator) -> np.ndarray:
    """Returns `[n_spans, 2]` sorted word spans `[start, end)` over `num_words` words.

    `round(0.075 * num_words) + {-1, 0, +1}` spans (at least one), each `max(1, Poisson(3))`
    words, placed uniformly at random among all placements that neither overlap nor touch (at
    least one unmasked word between two spans). When the spans cannot fit, the last ones are
    dropped, then the only one is shortened to leave one word unmasked (when there are two words
    or more). No spans for an empty text.
    """
    if num_words <= 0:
        return np.zeros((0, 2), np.int64)
    num_spans = max(1, int(round(SPANS_PER_WORD * num_words)) + int(rng.integers(-1, 2)))
    lengths = np.maximum(1, rng.poisson(MEAN_SPAN_WORDS, size=num_spans)).astype(np.int64)
    while num_spans > 1 and lengths.sum() + num_spans - 1 > num_words:
        num_spans -= 1
        lengths = lengths[:num_spans]
    if lengths.sum() > num_words - 1:  # one span left: keep a word of context when possible
        lengths[0] = max(1, num_words - 1)
    # Unmasked words beyond the mandatory separators, spread over num_spans + 1 gaps: a uniform
    # composition (stars and bars) gives every non-touching placement the same probability.
    spare = num_words - int(lengths.sum()) - (num_spans - 1)
    bars = np.sort(rng.choice(spare + num_spans, size=num_spans, replace=False))
    gaps = bars - np.arange(num_spans)  # unmasked words before each span, beyond separators
    starts = gaps + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
    return np.stack([starts, starts + lengths], axis=1).astype(np.int64)


def sample_char_spans(text: str, seed: int, example_id: int) -> np.ndarray:
    """Returns `[n_spans, 2]` character spans of `text` covering whole words (see
    `sample_word_spans`), deterministic in (seed, example_id)."""
    words = word_offsets(text)
    spans = sample_word_spans(len(words), example_rng(seed, example_id))
    if len(spans) == 0:
        return spans
    return np.stack([words[spans[:, 0], 0], words[spans[:, 1] - 1, 1]], axis=1)


def unmasked_segments(text: str, char_spans: np.ndarray) -> list[str]:
    """The `n_spans + 1` pieces of `text` around the spans (the generator's context)."""
    bounds = [0, *np.asarray(char_spans).reshape(-1).tolist(), len(text)]
    return [text[bounds[2 * i] : bounds[2 * i + 1]] for i in range(len(bounds) // 2)]


def span_texts(text: str, char_spans: np.ndarray) -> list[str]:
    """The original text of each span."""
    return [text[start:end] for start, end in np.asarray(char_spans).tolist()]


def ssr_inputs(text: str, char_spans: np.ndarray, fills: Sequence[str]) -> str:
    """`text` with span k replaced by `<extra_id_k> FILL_k <extra_id_k+1>`.

    The text around the spans is kept exactly, so `<extra_id_k>` is glued to the previous word
    when a span starts right after it (`dog.` with `.` masked): tokenize records with
    `preprocessors.ssr_preprocessors`, which spaces such sentinels so that each becomes its id.
    """
    segments = unmasked_segments(text, char_spans)
    if len(fills) != len(segments) - 1:
        raise ValueError(f"{len(fills)} fills for {len(segments) - 1} spans")
    pieces = [segments[0]]
    for k, fill in enumerate(fills):
        pieces += [f"{sentinel(k)} {fill} {sentinel(k + 1)}", segments[k + 1]]
    return "".join(pieces)


def ssr_targets(originals: Sequence[str]) -> str:
    """T5's span-corruption target shape: `<extra_id_0> ORIG_0 ... <extra_id_n>`."""
    pieces = [f"{sentinel(k)} {original}" for k, original in enumerate(originals)]
    return " ".join([*pieces, sentinel(len(originals))])
