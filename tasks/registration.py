"""Factories that register SeqIO tasks and mixtures for this project's objectives; registering a
name again replaces the earlier registration instead of failing."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import seqio

from e2s2_jax.data import encoder_views, preprocessors, same_document
from e2s2_jax.data.span_corruption import check_sentinels_available
from e2s2_jax.data.text_source import text_files_data_source

FilePatterns = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def add_task(name: str, **task_kwargs) -> seqio.Task:
    """Registers seqio.Task `name`, replacing any task already registered under that name."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks: Sequence, default_rate=None, **mixture_kwargs) -> seqio.Mixture:
    """Registers seqio.Mixture `name`, replacing any mixture already registered under it."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate, **mixture_kwargs)


def objective_task(
    name: str,
    source: seqio.DataSource,
    objective: str,
    vocabulary: seqio.Vocabulary,
    *,
    text_key: str = "text",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    documents_per_group: int | None = 128,
    shuffle_buffer_size: int | None = 1000,
    **objective_options,
) -> seqio.Task:
    """Registers a pretraining task: `source`'s text under `objective` with `vocabulary`.

    objective: one of preprocessors.OBJECTIVES ('span_corruption', 'e2s2', 'rts', 'c_rts',
    'slm', ...). The objectives with a second view add inputs_noised and noise_labels; the
    swap views' settings (swap_rate, cluster_file) are checked now (ConfigError).
    """
    if objective not in preprocessors.OBJECTIVES:
        raise ValueError(
            f"objective={objective!r} is not one of {sorted(preprocessors.OBJECTIVES)}."
        )
    check_sentinels_available(vocabulary, 1)
    view = preprocessors.OBJECTIVES[objective][2]
    if view is not None:
        view_options = {
            k: objective_options[k] for k in preprocessors.VIEW_OPTIONS if k in objective_options
        }
        encoder_views.check_view_settings(view, vocabulary, **view_options)
    return add_task(
        name,
        source=source,
        output_features=preprocessors.pretraining_output_features(
            vocabulary,
            with_noised_view=preprocessors.objective_has_noised_view(objective),
            with_pair_labels=objective in preprocessors.OBJECTIVES_WITH_PAIR_LABELS,
        ),
        preprocessors=preprocessors.pretraining_preprocessors(
            objective,
            text_key=text_key,
            noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length,
            documents_per_group=documents_per_group,
            **objective_options,
        ),
        shuffle_buffer_size=shuffle_buffer_size,
    )


def register_text_task(
    name: str,
    file_patterns: FilePatterns,
    objective: str,
    vocabulary: seqio.Vocabulary,
    *,
    on_bad_utf8: str = "skip",
    max_chars_per_document: int | None = None,
    **task_options,
) -> seqio.Task:
    """Registers a task over text files (one document per line, plain or .gz).

    file_patterns: {split: pattern(s)}, or pattern(s) for a 'train' split alone. Files are
    checked now (missing or empty files fail with the file named). task_options: as
    objective_task (noise_density, mean_noise_span_length, documents_per_group, ratios...).
    """
    if isinstance(file_patterns, Mapping):
        split_to_patterns = dict(file_patterns)
    else:
        split_to_patterns = {"train": file_patterns}
    source = text_files_data_source(
        split_to_patterns, on_bad_utf8=on_bad_utf8, max_chars_per_document=max_chars_per_document
    )
    return objective_task(name, source, objective, vocabulary, **task_options)


def register_tfds_task(
    name: str,
    tfds_name: str,
    objective: str,
    vocabulary: seqio.Vocabulary,
    *,
    tfds_data_dir: str | None = None,
    splits: Iterable[str] | None = ("train", "validation"),
    **task_options,
) -> seqio.Task:
    """Registers a task over a TFDS text dataset (e.g. 'c4/en:3.0.1'); nothing is read or
    downloaded until a dataset is requested, and then only from `tfds_data_dir`."""
    source = seqio.TfdsDataSource(
        tfds_name=tfds_name,
        tfds_data_dir=tfds_data_dir,
        splits=list(splits) if splits is not None else None,
    )
    return objective_task(name, source, objective, vocabulary, **task_options)


def register_ssr_task(
    name: str,
    split_to_filepattern: Mapping[str, str | Sequence[str]],
    vocabulary: seqio.Vocabulary,
    *,
    num_input_examples: Mapping[str, int] | None = None,
    shuffle_buffer_size: int | None = 1000,
) -> seqio.Task:
    """Registers a task over SSR records (TFRecords of `inputs`, `targets`, `fill_score`).

    Its features are inputs/targets like span corruption's, so the two mix in one mixture;
    `fill_score` passes through the task (a mixture keeps only the shared features).
    """
    return add_task(
        name,
        source=preprocessors.ssr_task_source(split_to_filepattern, num_input_examples),
        output_features=preprocessors.pretraining_output_features(vocabulary),
        preprocessors=preprocessors.ssr_preprocessors(),
        shuffle_buffer_size=shuffle_buffer_size,
    )


def register_same_document_task(
    name: str,
    split_documents: Mapping[str, Sequence[same_document.Document]],
    vocabulary: seqio.Vocabulary,
    *,
    pairs_per_epoch: Mapping[str, int] | None = None,
    span_words: int = 32,
    min_span_words: int = 8,
    seed: int = 0,
    shuffle_buffer_size: int | None = 1000,
) -> seqio.Task:
    """Registers the same-document task over `split_documents` ({split: documents, each a list
    of paragraphs}): span pairs labelled same paragraph / same document / different document
    (`same_document.SpanPairSampler`), inputs `span eos span`, the label's name as the target
    and `pair_labels`. Documents too few to draw every class raise ConfigError now."""
    return add_task(
        name,
        source=same_document.SpanPairsDataSource(
            split_documents,
            pairs_per_epoch=pairs_per_epoch,
            span_words=span_words,
            min_span_words=min_span_words,
            seed=seed,
        ),
        output_features=preprocessors.pretraining_output_features(
            vocabulary, with_pair_labels=True
        ),
        preprocessors=same_document.span_pair_preprocessors(),
        shuffle_buffer_size=shuffle_buffer_size,
    )


def register_mixture(
    name: str, task_names: Sequence[str], rates: str | Mapping[str, float] = "equal"
) -> seqio.Mixture:
    """Registers a mixture of tasks with the same output features.

    rates: 'equal'; 'examples' (by each task's number of source examples, which its source
    must know); or {task name: rate}.
    """
    if isinstance(rates, Mapping):
        missing = set(task_names) - set(rates)
        if missing:
            raise ValueError(f"rates has no entry for tasks {sorted(missing)}.")
        return add_mixture(name, [(task, rates[task]) for task in task_names])
    if rates == "equal":
        return add_mixture(name, list(task_names), default_rate=1.0)
    if rates == "examples":
        return add_mixture(
            name, list(task_names), default_rate=functools.partial(seqio.mixing_rate_num_examples)
        )
    raise ValueError(f"rates={rates!r}: use 'equal', 'examples' or a {{task name: rate}} dict.")
