"""SeqIO metric functions on decoded text: `fn(targets, predictions) -> {name: value}`.

Every value is a percentage (0-100); every function raises ValueError when the number of targets
and predictions differ.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import sacrebleu

Edit = tuple[int, int, tuple[str, ...]]


def _check(targets: Sequence[object], predictions: Sequence[object]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target (after stripping outer whitespace)."""
    _check(targets, predictions)
    hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions, strict=True))
    return {"exact_match": 100.0 * hits / max(len(targets), 1)}


def word_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of target words matched at the same position (missing words count wrong)."""
    _check(targets, predictions)
    correct = total = 0
    for target, prediction in zip(targets, predictions, strict=True):
        target_words, predicted_words = target.split(), prediction.split()
        total += len(target_words)
        correct += sum(t == p for t, p in zip(target_words, predicted_words, strict=False))
    return {"word_accuracy": 100.0 * correct / max(total, 1)}


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{"accuracy": percentage of predicted labels equal to the target label after stripping}."""
    return {"accuracy": exact_match(targets, predictions)["exact_match"]}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{"bleu": corpus BLEU} from sacrebleu's defaults (13a tokenisation, exp smoothing, cased)."""
    _check(targets, predictions)
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score}


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeLsum"}: F-measures (Porter-stemmed) averaged over examples.

    rougeLsum treats newlines as sentence boundaries (union LCS over sentences); on single-line
    texts it equals rougeL.
    """
    # Imported here: rouge_score loads NLTK (3 s), which every `import tasks` would pay.
    from rouge_score import rouge_scorer

    _check(targets, predictions)
    names = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for target, prediction in zip(targets, predictions, strict=True):
        scores = scorer.score(target, prediction)
        for name in names:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / max(len(targets), 1) for name, total in totals.items()}


def extract_edits(source_tokens: Sequence[str], other_tokens: Sequence[str]) -> list[Edit]:
    """Word-level edits turning `source_tokens` into `other_tokens`, as `(start, end, tokens)`.

    `start:end` is the replaced span in source positions (empty for an insertion) and `tokens` the
    replacement (empty for a deletion); one edit per non-equal difflib opcode, so adjacent changes
    merge into one edit.
    """
    matcher = difflib.SequenceMatcher(a=list(source_tokens), b=list(other_tokens), autojunk=False)
    return [
        (i1, i2, tuple(other_tokens[j1:j2]))
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def edit_f05(targets: Sequence[Mapping[str, str]], predictions: Sequence[str]) -> dict[str, float]:
    """{"edit_precision", "edit_recall", "edit_f0.5"} of corrections, counts summed over the corpus.

    Each target is `{"source": uncorrected text, "reference": gold correction}`, each prediction the
    model's correction; texts are split on whitespace and edits come from `extract_edits`. An edit
    counts as correct only if it exactly matches a reference edit. Unlike the M2 scorer there is no
    search of the edit lattice for the alignment that best matches the gold edits, and a single
    reference per sentence. Precision (recall) is 100 when there are no hypothesis (gold) edits.
    """
    _check(targets, predictions)
    tp = fp = fn = 0
    for target, prediction in zip(targets, predictions, strict=True):
        source = target["source"].split()
        reference_edits = set(extract_edits(source, target["reference"].split()))
        hypothesis_edits = set(extract_edits(source, prediction.split()))
        hits = len(hypothesis_edits & reference_edits)
        tp += hits
        fp += len(hypothesis_edits) - hits
        fn += len(reference_edits) - hits
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    beta2 = 0.5**2
    denominator = beta2 * precision + recall
    f_beta = (1 + beta2) * precision * recall / denominator if denominator else 0.0
    return {
        "edit_precision": 100.0 * precision,
        "edit_recall": 100.0 * recall,
        "edit_f0.5": 100.0 * f_beta,
    }
