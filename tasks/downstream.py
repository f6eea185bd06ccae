"""Downstream text-to-text tasks from real data (data/downstream/), plus GLUE and CoNLL-2014 style
registrations for users who have those datasets.

Shipped tasks (data/downstream/README.md gives sources, licences, splits and counts), each with
train / validation / test splits that hold out whole units (Bible books, Wikipedia articles,
held-out chapters):

| SeqIO task | inputs -> targets | metrics |
|---|---|---|
| downstream_kjv_to_sparv | KJV verse -> Reina-Valera 1909 verse (English -> Spanish) | BLEU |
| downstream_kjv_to_web | KJV verse -> World English Bible verse (archaic -> modern) | BLEU |
| downstream_wiki_summary | Wikipedia lead -> short description | ROUGE-1/2/Lsum |
| downstream_wiki_topic | Wikipedia lead -> one of 12 topic labels | accuracy |
| downstream_spelling_grammar | synthetic misspelt / ungrammatical -> clean sentence | edit F0.5 |

The files are `inputs<TAB>targets` lines, gzip; `read_tsv_examples` checks every line.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import seqio
import tensorflow as tf

from e2s2_jax import metrics
from tasks.registration import add_task

DOWNSTREAM_DIR = Path(__file__).resolve().parents[1] / "data" / "downstream"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DownstreamSpec:
    """A shipped dataset (directory under data/downstream) and how its SeqIO task reads it."""

    dataset: str
    prefix: str
    metric_fns: tuple[Callable, ...]
    with_source: bool = False  # targets postprocess to {source, reference} (edit metrics)


DOWNSTREAM_SPECS = {
    spec.dataset: spec
    for spec in (
        DownstreamSpec("kjv_to_sparv", "translate English to Spanish: ", (metrics.bleu,)),
        DownstreamSpec("kjv_to_web", "modernize: ", (metrics.bleu,)),
        DownstreamSpec("wiki_summary", "describe: ", (metrics.rouge,)),
        DownstreamSpec("wiki_topic", "topic: ", (metrics.accuracy,)),
        DownstreamSpec("spelling_grammar", "correct: ", (metrics.edit_f05,), with_source=True),
    )
}
DOWNSTREAM_TASKS = {dataset: f"downstream_{dataset}" for dataset in DOWNSTREAM_SPECS}


def dataset_files(dataset: str, root: str | Path = DOWNSTREAM_DIR) -> dict[str, str]:
    """{split: path} of a shipped dataset's files."""
    return {split: str(Path(root) / dataset / f"{split}.tsv.gz") for split in SPLITS}


def read_tsv_examples(path: str) -> list[tuple[str, str]]:
    """The (inputs, targets) pairs of an `inputs<TAB>targets` file (plain or .gz, UTF-8).

    Raises ValueError naming the file, the line and the fix for a line that is not two non-empty
    tab-separated fields; FileNotFoundError with the rebuild command for a missing file.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: the downstream data ships in data/downstream/ of a git "
            "checkout; rebuild it with `python scripts/build_downstream.py` (Bible, Wikipedia) or "
            "`python scripts/build_gec.py` (spelling_grammar)"
        )
    with tf.io.gfile.GFile(path, "rb") as raw:
        data = raw.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    pairs = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        try:
            fields = line.decode("utf-8").split("\t")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 ({error}); re-encode the file") from None
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(
                f"{path}:{number}: expected 'inputs<TAB>targets' with both fields non-empty, got "
                f"{len(fields)} field(s): {line[:80]!r}; replace tabs inside the text by spaces"
            )
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise ValueError(f"{path} has no examples: rebuild it or point the task at another file")
    return pairs


class TsvDataSource(seqio.DataSource):
    """{split: tsv file} as a seqio source of {inputs, targets} string examples. A split's file
    is read and checked whole on first use (the files are small enough to hold in memory)."""

    def __init__(self, split_to_file: Mapping[str, str]):
        self._files = dict(split_to_file)
        self._cache: dict[str, list[tuple[str, str]]] = {}
        super().__init__(splits=tuple(self._files))

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """The split's (inputs, targets) pairs, in file order."""
        if split not in self._files:
            raise ValueError(f"split {split!r} is not in this source: {sorted(self._files)}")
        if split not in self._cache:
            self._cache[split] = read_tsv_examples(self._files[split])
        return self._cache[split]

    def num_input_examples(self, split: str) -> int:
        return len(self.pairs(split))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def get_dataset(
        self, split: str, shuffle: bool = True, seed: int | None = None, shard_info=None, **_
    ) -> tf.data.Dataset:
        inputs, targets = zip(*self.pairs(split), strict=True)
        dataset = tf.data.Dataset.from_tensor_slices(
            {"inputs": list(inputs), "targets": list(targets)}
        )
        if shard_info is not None:
            dataset = dataset.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            dataset = dataset.shuffle(len(inputs), seed=seed)
        return dataset

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]


@seqio.map_over_dataset
def add_prefix(example: dict, prefix: str) -> dict:
    """Keeps the raw input as `source` and prepends the task prefix to `inputs`."""
    return {
        **example,
        "source": example["inputs"],
        "inputs": tf.strings.join([prefix, example["inputs"]]),
    }


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def source_and_reference(output: str, example=None, is_target: bool = False):
    """SeqIO postprocess_fn for edit metrics: a target becomes {source, reference}."""
    if not is_target:
        return output
    return {"source": _as_text(example["source"]), "reference": output}


def text_to_text_preprocessors(to_strings: Callable) -> list[Callable]:
    """`to_strings` (raw example -> {inputs, targets} strings), then tokenize, cache, EOS."""
    return [
        to_strings,
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ]


def text_to_text_task(
    name: str,
    split_to_file: Mapping[str, str],
    vocabulary: seqio.Vocabulary,
    *,
    prefix: str,
    metric_fns: Sequence[Callable],
    with_source: bool = False,
) -> seqio.Task:
    """Registers task `name` over `inputs<TAB>targets` files: prefix, tokenize, EOS."""
    features = {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
    return add_task(
        name,
        source=TsvDataSource(split_to_file),
        output_features=features,
        preprocessors=text_to_text_preprocessors(functools.partial(add_prefix, prefix=prefix)),
        postprocess_fn=source_and_reference if with_source else None,
        metric_fns=list(metric_fns),
    )


def register_downstream_tasks(
    vocabulary: seqio.Vocabulary | None = None, root: str | Path = DOWNSTREAM_DIR
) -> list[str]:
    """Registers DOWNSTREAM_TASKS over `root` (the shipped files unless given); returns names."""
    if vocabulary is None:
        from e2s2_jax.data.vocab import get_vocabulary

        vocabulary = get_vocabulary()
    for dataset, spec in DOWNSTREAM_SPECS.items():
        text_to_text_task(
            DOWNSTREAM_TASKS[dataset],
            dataset_files(dataset, root),
            vocabulary,
            prefix=spec.prefix,
            metric_fns=spec.metric_fns,
            with_source=spec.with_source,
        )
    return list(DOWNSTREAM_TASKS.values())


def register_gec_files_task(
    name: str, split_to_file: Mapping[str, str], vocabulary: seqio.Vocabulary
) -> seqio.Task:
    """A CoNLL-2014 / BEA style error-correction task over your own `source<TAB>correction`
    files (e.g. derived from M2 files with one annotator's edits applied), with edit F0.5."""
    return text_to_text_task(
        name,
        split_to_file,
        vocabulary,
        prefix="correct: ",
        metric_fns=(metrics.edit_f05,),
        with_source=True,
    )


# GLUE through TFDS (`glue/<config>`; needs the prepared TFDS data, e.g. tfds_data_dir on GCS):
# {config: (text features, label names)}; targets are the label names, as T5 does.
GLUE_CONFIGS = {
    "cola": (("sentence",), ("unacceptable", "acceptable")),
    "sst2": (("sentence",), ("negative", "positive")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate")),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment")),
}


def glue_text_to_text(dataset: tf.data.Dataset, config: str) -> tf.data.Dataset:
    """GLUE examples -> {inputs: "<config> key1: ... key2: ...", targets: label name}."""
    keys, labels = GLUE_CONFIGS[config]
    label_names = tf.constant(labels)

    def convert(example):
        parts = [config]
        for key in keys:
            parts += [f"{key}:", example[key]]
        return {
            "inputs": tf.strings.reduce_join(tf.stack(parts), separator=" "),
            "targets": tf.gather(label_names, tf.maximum(example["label"], 0)),
        }

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def register_glue_tasks(
    vocabulary: seqio.Vocabulary, tfds_data_dir: str | None = None, version: str = "2.0.0"
) -> list[str]:
    """Registers `glue_<config>` for GLUE_CONFIGS over TFDS; nothing is read until a dataset is
    requested, and then only from `tfds_data_dir` (no download here)."""
    features = {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
    names = []
    for config in GLUE_CONFIGS:
        names.append(f"glue_{config}")
        add_task(
            names[-1],
            source=seqio.TfdsDataSource(
                tfds_name=f"glue/{config}:{version}", tfds_data_dir=tfds_data_dir
            ),
            output_features=features,
            preprocessors=text_to_text_preprocessors(
                functools.partial(glue_text_to_text, config=config)
            ),
            metric_fns=[metrics.accuracy],
        )
    return names
