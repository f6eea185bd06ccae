"""The jobs' input: SeqIO tasks as per-process shards of global batches, the evaluation
batches, a task's examples, and the vocabulary a job tokenizes text with.

TensorFlow side: the train step and the model code never import this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the bundled, downstream and C4 tasks)
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.errors import ConfigError
from e2s2_jax.training import partitioning


def get_task(mixture_or_task_name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture; ConfigError saying how to register it when it is not."""
    try:
        return seqio.get_mixture_or_task(mixture_or_task_name)
    except ValueError as error:
        raise ConfigError(
            f"MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} is not registered ({error}). Register "
            "it in your own module (see tasks/registration.py) and import that module, e.g. with "
            "a Gin `import my_tasks` line."
        ) from error


def check_split(mixture_or_task_name: str, split: str, setting: str) -> None:
    """A split the task (or mixture) lacks is a ConfigError naming `setting`, the Gin parameter
    that chose it, and the splits there are."""
    splits = get_task(mixture_or_task_name).splits
    if split not in splits:
        raise ConfigError(
            f"{setting}={split!r}: {mixture_or_task_name} has no such split; choose one of "
            f"{sorted(splits)} with --gin.{setting}."
        )


def lookup_vocabulary(
    mixture_or_task_name: str | None = None, vocabulary_model: str | None = None
) -> seqio.Vocabulary:
    """The vocabulary a job tokenizes and detokenizes text with, in this order:

    1. `vocabulary_model`, a SentencePiece file, when given (the one explicit choice: an
       imported model's own vocabulary, whatever task it reads);
    2. else the task's (or mixture's) `targets` vocabulary, when a task is named;
    3. else the bundled demo vocabulary (`data.vocab.get_vocabulary()`).

    A SentencePiece file gets `get_vocabulary`'s checks (T5's pad and eos ids, 100 sentinels);
    a missing or unreadable one is a ConfigError.
    """
    if vocabulary_model is not None:
        try:
            return get_vocabulary(vocabulary_model)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"vocabulary_model={vocabulary_model!r}: {error}") from error
    if mixture_or_task_name is not None:
        return get_task(mixture_or_task_name).output_features["targets"].vocabulary
    return get_vocabulary()


def get_dataset(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
    feature_converter,
    *,
    shuffle: bool,
    seed: int | None,
    num_epochs: int | None,
    skip_batches: int = 0,
    shard: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """One shard's share of the global batches: `[batch_size / num_shards, ...]` numpy dicts.

    `shard` is `(index, num_shards)`, this process's by default: each process reads its own
    SeqIO shard. The first `skip_batches` are dropped (the restored data position; the seeded
    pipeline replays identically).
    """
    index, num_shards = shard or (jax.process_index(), jax.process_count())
    partitioning.check_batch_size(batch_size, num_processes=num_shards)
    get_task(mixture_or_task_name)
    dataset = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=dict(task_feature_lengths),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
        shard_info=seqio.ShardInfo(index=index, num_shards=num_shards),
        feature_converter=feature_converter,
        use_cached=False,
    )
    dataset = dataset.batch(batch_size // num_shards, drop_remainder=True)
    if skip_batches:
        dataset = dataset.skip(skip_batches)
    return dataset.prefetch(2)


def load_eval_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
    feature_converter,
    num_batches: int,
    mesh: jax.sharding.Mesh,
    rules: partitioning.Rules,
) -> list[dict]:
    """The first `num_batches` global batches of `split`, in order, as sharded arrays."""
    dataset = get_dataset(
        mixture_or_task_name,
        task_feature_lengths,
        split,
        batch_size,
        feature_converter,
        shuffle=False,
        seed=0,
        num_epochs=1,
    )
    return [
        partitioning.make_global_batch(b, mesh, rules)
        for b in numpy_batches(dataset.take(num_batches))
    ]


def task_examples(
    mixture_or_task_name: str, split: str, lengths: Mapping[str, int], max_examples: int
) -> tuple[seqio.Task, list[dict]]:
    """The task and the first `max_examples` (-1: all) of its preprocessed `split` examples, in
    order (unbatched numpy dicts, before any feature converter)."""
    task = get_task(mixture_or_task_name)
    dataset = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1)
    return task, list(numpy_batches(dataset.take(max_examples)))


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict]:
    """`dataset`'s elements as numpy; an error raised inside tf.data by the input (a damaged
    corpus file) becomes a ConfigError with that error's own message, not TensorFlow's dump."""
    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            # The Python error raised in the pipeline is the last `SomeError: message` line.
            raised = re.findall(r"^(\w+Error): (.+)$", error.message, flags=re.MULTILINE)
            cause = raised[-1][1] if raised else error.message.splitlines()[0]
            raise ConfigError(f"reading the input data: {cause}") from error
        yield element


def count_tokens(local_batch: Mapping[str, np.ndarray]) -> float:
    """Non-pad encoder and decoder tokens of the global batch (from this process's rows)."""
    tokens = sum(
        float(np.count_nonzero(local_batch[name]))
        for name in ("encoder_input_tokens", "decoder_target_tokens")
        if name in local_batch
    )
    return tokens * jax.process_count()
