"""The downstream tasks: the shipped files parse, the SeqIO tasks build with their prefixes and
metrics, bad files fail with the line named, and no test example leaks into training data."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
from pathlib import Path

import pytest

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES
from tasks import downstream

ROOT = Path(__file__).resolve().parents[1]
# Classification targets are labels, which repeat by design; only their inputs must not.
LABEL_TARGETS = {"wiki_topic"}
# Short descriptions repeat across articles ("Country in Europe"): a leak is the same lead.
SHARED_TARGETS_ALLOWED = {"wiki_topic", "wiki_summary"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fingerprint(text: str) -> str:
    """sha256 of the text lowercased, without punctuation, whitespace collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return hashlib.sha256(" ".join(words).encode()).hexdigest()


def _pairs(dataset: str, split: str) -> list[tuple[str, str]]:
    return downstream.read_tsv_examples(downstream.dataset_files(dataset)[split])


@pytest.fixture(scope="module")
def vocabulary():
    from e2s2_jax.data.vocab import get_vocabulary

    return get_vocabulary()


@pytest.fixture(scope="module")
def pretraining_fingerprints() -> set[str]:
    """Every paragraph of the pretraining corpus and every sentence of it (split by the rule
    the spelling_grammar build uses to cut its examples)."""
    split_sentences = _load_script("build_gec").split_sentences
    prints = set()
    for path in BUNDLED_TRAIN_FILES:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for paragraph in f:
                prints.add(_fingerprint(paragraph))
                prints.update(_fingerprint(s) for s in split_sentences(paragraph.strip()))
    return prints


@pytest.mark.parametrize("dataset", sorted(downstream.DOWNSTREAM_SPECS))
def test_no_test_example_is_in_training_data(dataset, pretraining_fingerprints):
    train = _pairs(dataset, "train")
    train_prints = {_fingerprint(inputs) for inputs, _ in train}
    if dataset not in SHARED_TARGETS_ALLOWED:
        train_prints |= {_fingerprint(targets) for _, targets in train}
    for split in ("validation", "test"):
        examples = _pairs(dataset, split)
        assert len(examples) >= 100, f"{dataset}/{split} has only {len(examples)} examples"
        for inputs, targets in examples:
            texts = [inputs] if dataset in LABEL_TARGETS else [inputs, targets]
            for text in texts:
                assert _fingerprint(text) not in pretraining_fingerprints, (dataset, split, text)
            shared = [t for t in texts[:1] if _fingerprint(t) in train_prints]
            if dataset not in SHARED_TARGETS_ALLOWED:
                shared = [t for t in texts if _fingerprint(t) in train_prints]
            assert not shared, (dataset, split, shared)


def test_topic_labels_are_twelve_and_every_split_has_them():
    labels = {split: {t for _, t in _pairs("wiki_topic", split)} for split in downstream.SPLITS}
    assert len(labels["train"]) == 12
    assert labels["test"] <= labels["train"] and labels["validation"] <= labels["train"]


def test_bible_tasks_hold_out_the_same_verses_on_both_sides():
    # The two Bible tasks share their English side and their book split.
    for split in downstream.SPLITS:
        spanish = {i for i, _ in _pairs("kjv_to_sparv", split)}
        modern = {i for i, _ in _pairs("kjv_to_web", split)}
        assert len(spanish & modern) > 0.9 * min(len(spanish), len(modern))
    test_inputs = {i for i, _ in _pairs("kjv_to_sparv", "test")}
    assert not test_inputs & {i for i, _ in _pairs("kjv_to_web", "train")}


@pytest.mark.parametrize("dataset", sorted(downstream.DOWNSTREAM_SPECS))
def test_task_builds_tokenized_examples_with_its_prefix(dataset, vocabulary):
    spec = downstream.DOWNSTREAM_SPECS[dataset]
    task = downstream.text_to_text_task(
        f"test_{dataset}",
        downstream.dataset_files(dataset),
        vocabulary,
        prefix=spec.prefix,
        metric_fns=spec.metric_fns,
        with_source=spec.with_source,
    )
    pairs = _pairs(dataset, "test")
    assert task.source.num_input_examples("test") == len(pairs)
    lengths = {"inputs": 512, "targets": 512}
    dataset_ = task.get_dataset(lengths, split="test", shuffle=False)
    for (inputs, targets), example in zip(
        pairs[:3], dataset_.take(3).as_numpy_iterator(), strict=True
    ):
        assert example["inputs_pretokenized"].decode() == spec.prefix + inputs
        assert vocabulary.decode(example["targets"].tolist()) == vocabulary.decode(
            vocabulary.encode(targets)
        )
        assert example["targets"][-1] == 1  # EOS
        target = task.postprocess_fn(targets, example=example, is_target=True)
        if spec.with_source:
            assert target == {"source": inputs, "reference": targets}
        else:
            assert target == targets
    assert list(task.metric_fns) == list(spec.metric_fns)


def test_import_registers_the_downstream_tasks():
    import seqio

    import tasks  # noqa: F401

    for name in downstream.DOWNSTREAM_TASKS.values():
        assert seqio.get_mixture_or_task(name).name == name


def _write_gz(path: Path, text: str) -> str:
    path.write_bytes(gzip.compress(text.encode()))
    return str(path)


def test_bad_lines_name_the_file_and_line(tmp_path):
    good = _write_gz(tmp_path / "good.tsv.gz", "a b\tc d\n\ne\tf\n")
    assert downstream.read_tsv_examples(good) == [("a b", "c d"), ("e", "f")]
    for name, text, needle in (
        ("three.tsv.gz", "a\tb\n c\td\te\n", ":2: expected 'inputs<TAB>targets'"),
        ("empty_field.tsv.gz", "a\t \n", ":1: expected"),
        ("no_tab.tsv.gz", "ok\tfine\njust text\n", ":2:"),
    ):
        path = _write_gz(tmp_path / name, text)
        with pytest.raises(ValueError, match=re.escape(path + needle)):
            downstream.read_tsv_examples(path)
    bad_utf8 = tmp_path / "latin1.tsv"
    bad_utf8.write_bytes("caf\xe9\tx\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.tsv:1: not UTF-8"):
        downstream.read_tsv_examples(str(bad_utf8))
    with pytest.raises(FileNotFoundError, match="build_downstream.py"):
        downstream.read_tsv_examples(str(tmp_path / "missing.tsv.gz"))
    with pytest.raises(ValueError, match="no examples"):
        downstream.read_tsv_examples(_write_gz(tmp_path / "blank.tsv.gz", "\n"))


def test_glue_examples_become_text_to_text():
    import tensorflow as tf

    rows = {"sentence1": [b"A man sleeps."], "sentence2": [b"Someone rests."], "label": [1]}
    converted = next(
        downstream.glue_text_to_text(
            tf.data.Dataset.from_tensor_slices(rows), "rte"
        ).as_numpy_iterator()
    )
    assert converted["inputs"] == b"rte sentence1: A man sleeps. sentence2: Someone rests."
    assert converted["targets"] == b"not_entailment"


@pytest.mark.parametrize("dataset", sorted(downstream.DOWNSTREAM_SPECS))
def test_task_gin_files_bind_the_task_for_finetune_and_eval(dataset):
    import gin

    from e2s2_jax import main as entry

    for mode, run_file in (("train", "gin/runs/finetune.gin"), ("eval", "gin/runs/eval.gin")):
        gin.clear_config()
        entry.parse_gin(
            mode,
            ["gin/models/t5_1_1_tiny.gin", run_file, f"gin/tasks/downstream_{dataset}.gin"],
            ['MODEL_DIR = "/tmp/unused"', 'INITIAL_CHECKPOINT = "/tmp/unused"'],
            "",
        )
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == downstream.DOWNSTREAM_TASKS[dataset]
        lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
        assert gin.query_parameter("DecodeConfig.max_decode_length") == lengths["targets"]
    gin.clear_config()
