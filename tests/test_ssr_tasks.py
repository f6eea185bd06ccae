"""SSR tasks for Gin: the task over records (every sentinel of every corpus record read as its
id), the mixture with span corruption at a rate, and curriculum stages that keep the easiest
fills first."""

from __future__ import annotations

import re

import numpy as np
import pytest
import seqio

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.ssr import job, spans
from e2s2_jax.ssr import tasks as ssr_tasks

NUM_RECORDS = 30


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    """Records written by the job's own writer, with fill scores -1, -2, ..., -30."""
    directory = tmp_path_factory.mktemp("records")
    protos = []
    for i in range(NUM_RECORDS):
        text = f"Record {i} of the corpus has a few more words in it."
        char_spans = spans.sample_char_spans(text, seed=0, example_id=i)
        example = job.Example(i, text, char_spans, [], 0)
        fills = [f"fill{i}"] * len(char_spans)
        protos.append(job.ssr_example_proto(example, fills, [-(i + 1.0)] * len(char_spans)))
    (directory / "ssr-00000-of-00001-000000.tfrecord").write_bytes(job._serialize_tfrecords(protos))
    return str(directory)


def _examples(name, split="train"):
    task = seqio.get_mixture_or_task(name)
    dataset = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    return list(dataset.as_numpy_iterator())


def test_task_reads_every_record(records_dir):
    name = ssr_tasks.ssr_mixture_or_task(records_dir, name="test_ssr_all")
    examples = _examples(name)
    assert sorted(float(e["fill_score"]) for e in examples) == [-(i + 1.0) for i in range(30)][::-1]
    vocabulary = get_vocabulary()
    first = min(examples, key=lambda e: -e["fill_score"])
    assert "fill0" in vocabulary.decode([int(t) for t in first["inputs"] if t > 1])


def _corpus_records(directory, max_words: int) -> list[tuple[int, str]]:
    """Writes the job's record of every `max_words`-word window of the bundled corpus (both
    splits; the original span texts as fills) to `directory`; returns each record's (number of
    spans, inputs text)."""
    documents = read_text_documents(BUNDLED_TRAIN_FILES + BUNDLED_VALIDATION_FILES)
    protos, records = [], []
    for example_id, text in job.iterate_examples(documents, max_words, None):
        char_spans = spans.sample_char_spans(text, seed=0, example_id=example_id)
        originals = spans.span_texts(text, char_spans)
        example = job.Example(example_id, text, char_spans, [], 0)
        protos.append(job.ssr_example_proto(example, originals, [-1.0] * len(originals)))
        records.append((len(originals), spans.ssr_inputs(text, char_spans, originals)))
    (directory / "ssr-00000-of-00001-000000.tfrecord").write_bytes(job._serialize_tfrecords(protos))
    return records


@pytest.mark.parametrize("max_words", [64, 128])
def test_every_sentinel_of_the_corpus_records_becomes_its_id(tmp_path, max_words):
    """A span right after a word (`dog.` with `.` masked) glues its sentinel to that word in the
    record text (`dog<extra_id_0>`); the task still reads every sentinel as its id: inputs hold
    <extra_id_k> FILL_k <extra_id_k+1> per span (2n ids), targets <extra_id_0> ... <extra_id_n>."""
    records = _corpus_records(tmp_path, max_words)
    examples = _examples(ssr_tasks.ssr_mixture_or_task(str(tmp_path), name=f"test_ssr_{max_words}"))
    vocabulary = get_vocabulary()
    first_sentinel = vocabulary.vocab_size - vocabulary.extra_ids

    def sentinels(ids) -> list[int]:
        """The sentinel numbers k of `ids`, in order."""
        return [vocabulary.vocab_size - 1 - int(i) for i in ids if i >= first_sentinel]

    assert len(examples) == len(records)
    wrong, glued = [], 0
    for example, (n, inputs) in zip(examples, records, strict=True):
        expected_inputs = [j for k in range(n) for j in (k, k + 1)]
        if (sentinels(example["inputs"]), sentinels(example["targets"])) != (
            expected_inputs,
            list(range(n + 1)),
        ):
            wrong.append(inputs)
        if re.search(r"\S<extra_id_", inputs):
            glued += 1
        else:  # nothing glued: the task tokenizes the record text unchanged
            assert example["inputs_pretokenized"].decode() == inputs
    assert glued > len(records) // 4  # the case is common: every window size exercises it
    assert not wrong, f"{len(wrong)} of {len(records)} records lose sentinels, e.g. {wrong[0]!r}"


@pytest.mark.parametrize(("stage", "kept"), [(0, 10), (1, 20), (2, 30)])
def test_curriculum_stage_keeps_the_easiest_fills(records_dir, stage, kept):
    name = ssr_tasks.ssr_mixture_or_task(
        records_dir, name="test_ssr_curriculum", curriculum_stage=stage, curriculum_stages=3
    )
    scores = sorted((float(e["fill_score"]) for e in _examples(name)), reverse=True)
    # The highest fill log-probabilities: -1 ... -kept (np.quantile's linear rule at the edge).
    assert scores[: kept - 1] == [-(i + 1.0) for i in range(kept - 1)]
    assert kept - 1 <= len(scores) <= kept + 1


def test_mixture_with_span_corruption_follows_the_rate(records_dir):
    name = ssr_tasks.ssr_mixture_or_task(
        records_dir, name="test_ssr_mix", span_corruption_rate=0.25
    )
    mixture = seqio.get_mixture_or_task(name)
    rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
    assert rates == {"test_ssr_mix": 0.75, "bundled_span_corruption": 0.25}
    dataset = mixture.get_dataset(
        {"inputs": 64, "targets": 32}, split="train", shuffle=True, seed=1, num_epochs=None
    )
    vocabulary = get_vocabulary()
    from_ssr = [
        "fill" in vocabulary.decode([int(t) for t in e["inputs"] if t > 1])
        for e in dataset.take(400).as_numpy_iterator()
    ]
    assert abs(np.mean(from_ssr) - 0.75) < 0.08


def test_missing_records_name_the_job(tmp_path):
    with pytest.raises(FileNotFoundError, match="ssr-generate"):
        ssr_tasks.ssr_mixture_or_task(str(tmp_path))
