"""Text metrics against hand-computed values and independent implementations."""

import math
from collections import Counter

import pytest
import sacrebleu
from rouge_score import rouge_scorer, tokenizers

from e2s2_jax import metrics


def test_exact_match_and_word_accuracy():
    targets = ["The cat sat.", "A dog", "one two three"]
    predictions = [" The cat sat. ", "a dog", "one three"]
    assert metrics.exact_match(targets, predictions) == {"exact_match": pytest.approx(100 / 3)}
    # words: 3/3 + 1/2 + 1/3 (position-wise: "one" right, "three" vs "two" wrong, one missing)
    assert metrics.word_accuracy(targets, predictions) == {"word_accuracy": pytest.approx(62.5)}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.exact_match(["a", "b"], ["a"])


def test_accuracy():
    targets = ["positive", "negative", "neutral", "positive"]
    predictions = [" positive\n", "positive", "neutral", "Positive"]  # stripped; case counts
    assert metrics.accuracy(targets, predictions) == {"accuracy": pytest.approx(50.0)}
    assert metrics.accuracy(["yes"], ["yes"]) == {"accuracy": 100.0}
    assert metrics.accuracy(["yes"], ["no"]) == {"accuracy": 0.0}


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.bleu, metrics.rouge, metrics.edit_f05])
def test_length_mismatch_raises(fn):
    targets = [{"source": "a", "reference": "b"}] * 2 if fn is metrics.edit_f05 else ["a", "b"]
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        fn(targets, ["a"])


def _ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _closed_form_bleu(targets, predictions):
    """Corpus BLEU from its definition: clipped n-gram precisions n=1..4, brevity penalty."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for target, prediction in zip(targets, predictions, strict=True):
        ref, hyp = target.split(), prediction.split()
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += sum(hyp_counts.values())
    assert all(matches), "smoothing would apply"
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def test_bleu_hand_computed():
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == {
        "bleu": pytest.approx(100.0)
    }
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat": clipped matches 5/6, 3/5, 2/4,
    # 1/3 for n = 1..4, equal lengths (BP 1), so BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    # = (1/12) ** 0.25 = 53.728...
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"])["bleu"] == (
        pytest.approx(100 * 12**-0.25)
    )
    # hyp "the cat sat on" (4 words) vs the 6-word ref: all precisions 1, BP = exp(1 - 6/4)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on"])["bleu"] == (
        pytest.approx(100 * math.exp(-0.5))
    )


@pytest.mark.parametrize(
    ("targets", "predictions"),
    [
        (["the cat sat on the mat"], ["the cat sat on a mat"]),
        (["the cat sat on the mat"], ["the the the cat sat on"]),  # clipping and brevity
        (
            ["a dog ran in the park today", "he went to the big red house", "we like green tea"],
            ["a dog ran in a park", "he walked to the big red house again", "we love green tea"],
        ),
        (
            ["there is a small bird on the old tree", "my name is bob"],
            ["there is a bird sitting on the old tree now", "my name is not bob"],
        ),
    ],
)
def test_bleu_matches_closed_form_and_sacrebleu(targets, predictions):
    score = metrics.bleu(targets, predictions)["bleu"]
    assert score == pytest.approx(_closed_form_bleu(targets, predictions))
    assert score == pytest.approx(sacrebleu.corpus_bleu(predictions, [targets]).score)


@pytest.mark.parametrize(
    ("targets", "predictions"),
    [
        (
            ["The quick brown fox, it jumped!", "Hello world.", "It's 3.5 km away (roughly)."],
            ["The quick brown fox jumped!", "Hello, world.", "It is 3.5 km away."],
        ),
        (["the cat sat down"], ["the cat ran down"]),  # no 3- or 4-gram match: exp smoothing
    ],
)
def test_bleu_matches_sacrebleu_defaults(targets, predictions):
    expected = sacrebleu.corpus_bleu(predictions, [targets]).score
    assert metrics.bleu(targets, predictions) == {"bleu": pytest.approx(expected)}
    assert 0.0 < expected < 100.0


def _f1(overlap, hyp_total, ref_total):
    precision, recall = overlap / max(hyp_total, 1), overlap / max(ref_total, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            if x == y:
                table[i + 1][j + 1] = table[i][j] + 1
            else:
                table[i + 1][j + 1] = max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _count_rouge(target, prediction):
    """ROUGE-1/2/L F1 from n-gram and LCS counts on lowercased whitespace tokens."""
    ref, hyp = target.lower().split(), prediction.lower().split()
    scores = {}
    for n in (1, 2):
        ref_counts, hyp_counts = _ngrams(ref, n), _ngrams(hyp, n)
        overlap = sum((ref_counts & hyp_counts).values())
        scores[f"rouge{n}"] = _f1(overlap, sum(hyp_counts.values()), sum(ref_counts.values()))
    scores["rougeLsum"] = _f1(_lcs(ref, hyp), len(hyp), len(ref))
    return scores


ROUGE_PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("The big red dog ran", "a red dog ran to the big cat"),
    ("we saw a cat", "no one saw it"),
    ("the cat and the dog", "the dog and the cat"),
]


def test_rouge_hand_computed():
    # ref "the cat sat on the mat", hyp "the cat sat on a mat": unigram overlap 5 of 6 each way
    # (F 5/6); bigram overlap {the cat, cat sat, sat on} = 3 of 5 each way (F 3/5); LCS
    # "the cat sat on mat" = 5 of 6 (F 5/6).
    assert metrics.rouge(["the cat sat on the mat"], ["the cat sat on a mat"]) == {
        "rouge1": pytest.approx(500 / 6),
        "rouge2": pytest.approx(60.0),
        "rougeLsum": pytest.approx(500 / 6),
    }


def test_rouge_matches_counts_and_rouge_score():
    targets, predictions = (list(x) for x in zip(*ROUGE_PAIRS, strict=True))
    # Words of at most three letters: the Porter stemmer leaves them unchanged.
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    for text in targets + predictions:
        assert tokenizer.tokenize(text) == text.lower().split()
    counted = [_count_rouge(t, p) for t, p in ROUGE_PAIRS]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    library = [scorer.score(t, p) for t, p in ROUGE_PAIRS]
    result = metrics.rouge(targets, predictions)
    assert set(result) == {"rouge1", "rouge2", "rougeLsum"}
    for name in result:
        expected = 100 * sum(c[name] for c in counted) / len(counted)
        assert result[name] == pytest.approx(expected)
        assert result[name] == pytest.approx(100 * sum(s[name].fmeasure for s in library) / 4)
    # Single-line texts: rougeLsum is rougeL.
    rouge_l = 100 * sum(s["rougeL"].fmeasure for s in library) / 4
    assert result["rougeLsum"] == pytest.approx(rouge_l)


def test_rouge_stems_and_splits_summary_sentences():
    # "cats"/"cat" and "running"/"run" share stems.
    stemmed = metrics.rouge(["the cat is running"], ["The cats is run"])
    assert stemmed["rouge1"] == pytest.approx(100)
    targets, predictions = ["the cat sat\nthe dog ran"], ["the dog ran\nthe cat sat"]
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    library = scorer.score(targets[0], predictions[0])
    result = metrics.rouge(targets, predictions)["rougeLsum"]
    assert result == pytest.approx(100 * library["rougeLsum"].fmeasure)
    # Union LCS per sentence recovers both sentences despite the swapped order; the plain LCS
    # over the whole text is only 3 of 6 tokens ("the cat sat").
    assert result == pytest.approx(100)
    assert library["rougeL"].fmeasure == pytest.approx(0.5)


def test_extract_edits():
    source = "she go to school every days".split()
    assert metrics.extract_edits(source, "she goes to school every day".split()) == [
        (1, 2, ("goes",)),
        (5, 6, ("day",)),
    ]
    assert metrics.extract_edits(source, source) == []
    assert metrics.extract_edits("he went school".split(), "he went to school".split()) == [
        (2, 2, ("to",))  # insertion: empty source span
    ]
    assert metrics.extract_edits("he went to to school".split(), "he went to school".split()) == [
        (3, 4, ())  # deletion: empty replacement
    ]


def _gec(source, reference):
    return {"source": source, "reference": reference}


SOURCE = "she go to school every days"
REFERENCE = "she goes to school every day"  # gold edits: go -> goes, days -> day


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (REFERENCE, (100, 100, 100)),  # perfect correction
        (SOURCE, (100, 0, 0)),  # no edits: precision 1 by convention, nothing recalled
        ("she goes to school every daily", (50, 50, 50)),  # TP 1, FP 1, FN 1
        # TP 1, FP 0, FN 1: P 1, R 0.5, F0.5 = 1.25 * 0.5 / (0.25 + 0.5) = 5/6
        ("she goes to school every days", (100, 50, 250 / 3)),
    ],
)
def test_edit_f05_single_sentence(prediction, expected):
    result = metrics.edit_f05([_gec(SOURCE, REFERENCE)], [prediction])
    assert result == {
        "edit_precision": pytest.approx(expected[0]),
        "edit_recall": pytest.approx(expected[1]),
        "edit_f0.5": pytest.approx(expected[2]),
    }


@pytest.mark.parametrize(
    ("source", "reference", "wrong"),
    [
        ("he went school", "he went to school", "he went at school"),  # insertion
        ("he went to to school", "he went to school", "he went to to"),  # deletion
        ("he go to school", "he goes to school", "he went to school"),  # substitution
    ],
)
def test_edit_f05_edit_kinds(source, reference, wrong):
    perfect = metrics.edit_f05([_gec(source, reference)], [reference])
    assert perfect == {"edit_precision": 100, "edit_recall": 100, "edit_f0.5": 100}
    missed = metrics.edit_f05([_gec(source, reference)], [wrong])
    assert missed == {"edit_precision": 0, "edit_recall": 0, "edit_f0.5": 0}


def test_edit_f05_sums_counts_over_corpus():
    targets = [
        _gec(SOURCE, REFERENCE),
        _gec("he go to school in town", "he goes to school in town"),
    ]
    # Sentence 1: TP 1, FP 0, FN 1. Sentence 2: the gold edit plus two wrong ones (insert "the",
    # "in" -> "at"): TP 1, FP 2, FN 0.
    predictions = ["she goes to school every days", "he goes to the school at town"]
    # Summed TP 2, FP 2, FN 1: P 1/2, R 2/3, F0.5 = 1.25 * (1/3) / (1/8 + 2/3) = 10/19.
    # (Averaging per sentence would give (5/6 + 5/13) / 2 instead.)
    assert metrics.edit_f05(targets, predictions) == {
        "edit_precision": pytest.approx(50),
        "edit_recall": pytest.approx(200 / 3),
        "edit_f0.5": pytest.approx(1000 / 19),
    }
