"""SSR's offline generation job (`python -m e2s2_jax.main ssr-generate`): a generator model fills
masked word spans by nucleus sampling and the job writes SSR records as TFRecord shards.

Each example (a window of at most `max_words_per_example` words of a document) has a global id;
process p of P takes the ids with `id % P == p`, in chunks of `examples_per_chunk`. A chunk is
committed by renaming its finished TFRecord file and then its stats file into place, so a rerun
after a kill skips committed chunks and redoes the rest: the output holds each example exactly
once (or counts it as dropped). Spans and sampling depend only on (seed, example id), so a redone
chunk is identical to the one that was lost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from e2s2_jax import offline_jobs
from e2s2_jax.console import console
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.decoding import DecodeConfig, make_predict_fn
from e2s2_jax.errors import ConfigError
from e2s2_jax.ssr import spans
from e2s2_jax.training import partitioning
from e2s2_jax.training.checkpoints import restore_params
from e2s2_jax.training.input_pipeline import get_task, lookup_vocabulary

DROP_REASONS = ("sentinel_missing", "empty_fill", "truncated", "invalid_token", "too_long")
_LENGTH_BUCKET = 32  # inputs and decode budgets round up to a multiple: few compilations


@dataclasses.dataclass
class Example:
    """One example: its text window, spans, generator input ids and decode budget need."""

    example_id: int
    text: str
    char_spans: np.ndarray  # [n_spans, 2] character offsets
    input_ids: list[int]  # the generator's input: text with sentinels, then eos
    masked_pieces: int  # sentencepieces of the masked text

    @property
    def num_spans(self) -> int:
        return len(self.char_spans)


def document_windows(text: str, max_words: int) -> list[str]:
    """`text` cut at word boundaries into windows of at most `max_words` words (exact
    substrings of `text`, so spans map back to it)."""
    words = spans.word_offsets(text)
    return [
        text[words[start, 0] : words[min(start + max_words, len(words)) - 1, 1]]
        for start in range(0, len(words), max_words)
    ]


def read_documents(
    mixture_or_task_name: str | None, split: str, text_key: str, input_files: Sequence[str] | None
) -> Iterator[str]:
    """The documents of a SeqIO task's source split (its `text_key`), or of text files (one
    document per line, plain or .gz), in a fixed order."""
    if input_files:
        yield from read_text_documents(list(input_files))
        return
    task = get_task(mixture_or_task_name)
    dataset = task.source.get_dataset(split=split, shuffle=False)
    for example in dataset.as_numpy_iterator():
        yield example[text_key].decode("utf-8")


def iterate_examples(
    documents: Iterator[str], max_words: int, max_examples: int | None
) -> Iterator[tuple[int, str]]:
    """Yields (global example id, text window) in order, at most `max_examples`."""
    example_id = 0
    for document in documents:
        for window in document_windows(document, max_words):
            if max_examples is not None and example_id >= max_examples:
                return
            yield example_id, window
            example_id += 1


def make_example(example_id: int, text: str, vocabulary, seed: int, eos_id: int) -> Example:
    """Samples the spans of `text` and builds the generator's input ids: the unmasked pieces
    with sentinel k in place of span k (T5's span-corruption input shape), then eos."""
    char_spans = spans.sample_char_spans(text, seed, example_id)
    segments = spans.unmasked_segments(text, char_spans)
    sentinel_0 = vocabulary.vocab_size - 1
    input_ids: list[int] = []
    for k, segment in enumerate(segments):
        input_ids += vocabulary.encode(segment) if segment.strip() else []
        if k < len(char_spans):
            input_ids.append(sentinel_0 - k)
    input_ids.append(eos_id)
    masked = sum(len(vocabulary.encode(t)) for t in spans.span_texts(text, char_spans))
    return Example(example_id, text, char_spans, input_ids, masked)


def decode_budget(example: Example, budget_factor: float) -> int:
    """Tokens the generator may emit: `budget_factor` x the masked sentencepieces, plus the
    n + 1 sentinels and eos."""
    return math.ceil(budget_factor * example.masked_pieces) + example.num_spans + 2


def parse_fills(
    tokens: np.ndarray, log_probs: np.ndarray, num_spans: int, vocabulary, eos_id: int
) -> tuple[list[str], list[float]] | str:
    """Splits one generated row `<extra_id_0> FILL_0 <extra_id_1> ... FILL_{n-1} [<extra_id_n>]
    eos` into the n fills, each decoded as a whole, and their mean token log-probabilities.

    Returns (fills, mean log-probs), or the drop reason: a sentinel missing or out of order, an
    empty fill, the last fill cut by the budget, or an id outside the vocabulary.
    """
    vocab_size = vocabulary.vocab_size
    first_sentinel = vocab_size - vocabulary.extra_ids
    tokens = [int(t) for t in tokens]
    end = tokens.index(eos_id) if eos_id in tokens else None
    body = tokens[:end]
    if any(t >= vocab_size for t in body):
        return "invalid_token"
    positions = [i for i, t in enumerate(body) if t >= first_sentinel]
    indices = [vocab_size - 1 - body[i] for i in positions]
    if positions[:1] != [0] or indices[:num_spans] != list(range(num_spans)):
        return "sentinel_missing"
    if len(positions) > num_spans:  # fill n-1 ends at the next sentinel (ideally <extra_id_n>)
        closing = positions[num_spans]
    elif end is not None:  # ... or at eos
        closing = len(body)
    else:  # no closing sentinel and no eos: the budget cut the last fill
        return "truncated"
    positions = [*positions[:num_spans], closing]
    fills, fill_log_probs = [], []
    for k in range(num_spans):
        start, stop = positions[k] + 1, positions[k + 1]
        if stop <= start:
            return "empty_fill"
        fill = vocabulary.decode(body[start:stop]).strip()
        if not fill or "<extra_id_" in fill:
            return "empty_fill"
        fills.append(" ".join(fill.split()))  # one line: newlines would split documents
        fill_log_probs.append(float(np.mean(log_probs[start:stop])))
    return fills, fill_log_probs


def ssr_example_proto(example: Example, fills: Sequence[str], fill_log_probs: Sequence[float]):
    """The tf.train.Example of one SSR record (`inputs`, `targets`, `fill_score` and, for
    curricula and checks, `fill_log_probs` and `example_id`)."""
    originals = spans.span_texts(example.text, example.char_spans)

    def text(value: str):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))

    feature = {
        "inputs": text(spans.ssr_inputs(example.text, example.char_spans, fills)),
        "targets": text(spans.ssr_targets(originals)),
        "fill_score": tf.train.Feature(
            float_list=tf.train.FloatList(value=[float(np.mean(fill_log_probs))])
        ),
        "fill_log_probs": tf.train.Feature(float_list=tf.train.FloatList(value=fill_log_probs)),
        "example_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[example.example_id])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _serialize_tfrecords(protos: Sequence[tf.train.Example]) -> bytes:
    """TFRecord framing of serialized examples (written in one piece, then renamed)."""
    tmp_path = os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"ssr-{os.getpid()}-{time.time_ns()}.tfrecord"
    )
    try:
        with tf.io.TFRecordWriter(tmp_path) as writer:
            for proto in protos:
                writer.write(proto.SerializeToString())
        with open(tmp_path, "rb") as f:
            return f.read()
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


@dataclasses.dataclass
class ChunkStats:
    examples: int = 0
    kept: int = 0
    spans: int = 0
    generated_tokens: int = 0
    dropped: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def add(self, other: ChunkStats) -> None:
        self.examples += other.examples
        self.kept += other.kept
        self.spans += other.spans
        self.generated_tokens += other.generated_tokens
        for reason, count in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count


class Generator:
    """Fills a batch of examples with the generator: `[batch, input length]` tokens sharded over
    the mesh's batch axes, nucleus sampling with a KV cache (decoding.make_predict_fn)."""

    def __init__(self, model, params, mesh, rules, *, batch_size, top_p, temperature, seed):
        self.model, self.params, self.mesh, self.rules = model, params, mesh, rules
        self.batch_size, self.top_p, self.temperature = batch_size, top_p, temperature
        self.rng = jax.random.key(seed)
        self.sharding = partitioning.batch_sharding(mesh, rules)

    def __call__(self, inputs: np.ndarray, budget: int, first_example_id: int):
        """Returns (tokens [batch, budget], token_log_probs [batch, budget]) as numpy."""
        config = DecodeConfig(
            method="sample",
            max_decode_length=budget,
            temperature=self.temperature,
            top_p=self.top_p,
        )
        predict = make_predict_fn(self.model, config)
        tokens = jax.device_put(jnp.asarray(inputs), self.sharding)
        rng = jax.random.fold_in(self.rng, first_example_id)
        with self.mesh, nn.logical_axis_rules(self.rules):
            result = predict(self.params, tokens, rng)
        return np.asarray(result.tokens), np.asarray(result.token_log_probs)


def generate_chunk(
    examples: Sequence[Example],
    generator: Generator,
    vocabulary,
    *,
    batch_size: int,
    budget_factor: float,
    max_input_length: int,
    max_decode_length: int,
    eos_id: int,
) -> tuple[list[tf.train.Example], ChunkStats]:
    """Fills `examples` in batches; returns the records of the well-formed ones and the stats."""
    stats = ChunkStats(examples=len(examples))
    usable = []
    for example in examples:
        if len(example.input_ids) > max_input_length:
            stats.dropped["too_long"] += 1
        else:
            usable.append(example)
    records = []
    for start in range(0, len(usable), batch_size):
        batch = usable[start : start + batch_size]
        length = min(max_input_length, _round_up(max(len(e.input_ids) for e in batch), 32))
        inputs = np.zeros((batch_size, length), np.int32)
        inputs[:, 0] = eos_id  # padding rows: an empty input
        for row, example in enumerate(batch):
            inputs[row, : len(example.input_ids)] = example.input_ids
        need = max(decode_budget(e, budget_factor) for e in batch)
        budget = min(max_decode_length, _round_up(need, _LENGTH_BUCKET))
        tokens, log_probs = generator(inputs, budget, batch[0].example_id)
        for row, example in enumerate(batch):
            stats.generated_tokens += int(np.sum(tokens[row] != 0))
            parsed = parse_fills(tokens[row], log_probs[row], example.num_spans, vocabulary, eos_id)
            if isinstance(parsed, str):
                stats.dropped[parsed] += 1
                continue
            fills, fill_log_probs = parsed
            records.append(ssr_example_proto(example, fills, fill_log_probs))
            stats.kept += 1
            stats.spans += example.num_spans
    return records, stats


@gin.configurable(module="e2s2_jax")
def ssr_generate(
    *,
    output_dir: str = gin.REQUIRED,
    generator_dir: str = gin.REQUIRED,
    model=gin.REQUIRED,
    mixture_or_task_name: str | None = None,
    split: str = "train",
    text_key: str = "text",
    input_files: Sequence[str] | None = None,
    vocabulary_model: str | None = None,
    max_examples: int | None = None,
    max_words_per_example: int = 128,
    examples_per_chunk: int = 1024,
    batch_size: int = 64,
    budget_factor: float = 3.0,
    max_input_length: int = 512,
    max_decode_length: int = 512,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    checkpoint_step: int | None = None,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> dict:
    """Generates SSR records from a task's `split` (or `input_files`) into `output_dir` with the
    generator `model` restored from `generator_dir` (a train run's MODEL_DIR, a checkpoint step
    or an imported Hugging Face params directory); returns this process's summary.

    Writes `ssr-PPPPP-of-QQQQQ-CCCCCC.tfrecord` (process P of Q, chunk C), `progress/` stats per
    committed chunk, and `summary-PPPPP-of-QQQQQ.json` (plus `summary.json` once every process
    has finished). A rerun resumes. `budget_factor` x the masked sentencepieces (plus sentinels)
    is each batch's decode budget, capped at `max_decode_length`.
    """
    if (mixture_or_task_name is None) == (not input_files):
        raise ConfigError(
            'ssr_generate needs exactly one input: --gin.ssr_generate.input_files=["a.txt"] or '
            '--gin.ssr_generate.mixture_or_task_name=\\"a_task\\".'
        )
    if budget_factor < 3.0:
        console.warning(
            f"warning: budget_factor={budget_factor} < 3 cuts long fills (METHODS.md 2.2)"
        )
    vocabulary = lookup_vocabulary(mixture_or_task_name, vocabulary_model)
    cfg = model.config
    if vocabulary.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"the vocabulary has {vocabulary.vocab_size} ids but the generator's vocab_size is "
            f"{cfg.vocab_size}: use the generator's own vocabulary (vocabulary_model)."
        )
    process_index, process_count = jax.process_index(), jax.process_count()
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.job_mesh("ssr_generate", mesh_shape, batch_size)
    tf.io.gfile.makedirs(os.path.join(output_dir, "progress"))
    offline_jobs.check_job_config(
        output_dir,
        {
            "process_count": process_count,
            "examples_per_chunk": examples_per_chunk,
            "max_words_per_example": max_words_per_example,
            "max_examples": max_examples,
            "seed": seed,
            "source": mixture_or_task_name or list(input_files),
            "split": split,
        },
    )
    params = restore_params(generator_dir, model, mesh, rules, checkpoint_step)
    generator = Generator(
        model,
        params,
        mesh,
        rules,
        batch_size=batch_size,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
    )
    shard = f"{process_index:05d}-of-{process_count:05d}"
    total = _count_examples(
        mixture_or_task_name, split, text_key, input_files, max_words_per_example, max_examples
    )
    shard_total = None if total is None else len(range(process_index, total, process_count))
    totals, resumed, done_examples = ChunkStats(), ChunkStats(), 0
    start_time = time.perf_counter()
    documents = read_documents(mixture_or_task_name, split, text_key, input_files)
    examples = iterate_examples(documents, max_words_per_example, max_examples)
    for number, chunk in offline_jobs.chunks(
        examples, process_index, process_count, examples_per_chunk
    ):
        stats_path = os.path.join(output_dir, "progress", f"{shard}-{number:06d}.json")
        if tf.io.gfile.exists(stats_path):  # committed before a kill: skip it
            with tf.io.gfile.GFile(stats_path) as f:
                resumed.add(ChunkStats(**json.load(f)))
            done_examples += len(chunk)
            continue
        built = [make_example(i, text, vocabulary, seed, cfg.eos_id) for i, text in chunk]
        records, stats = generate_chunk(
            built,
            generator,
            vocabulary,
            batch_size=batch_size,
            budget_factor=budget_factor,
            max_input_length=max_input_length,
            max_decode_length=max_decode_length,
            eos_id=cfg.eos_id,
        )
        record_path = os.path.join(output_dir, f"ssr-{shard}-{number:06d}.tfrecord")
        offline_jobs.write_atomically(record_path, _serialize_tfrecords(records))
        offline_jobs.write_atomically(stats_path, json.dumps(dataclasses.asdict(stats)).encode())
        totals.add(stats)
        done_examples += len(chunk)
        _log_progress(shard, number, totals, done_examples, shard_total, start_time)
    totals.add(resumed)
    seconds = time.perf_counter() - start_time
    summary = {
        **dataclasses.asdict(totals),
        "dropped_total": sum(totals.dropped.values()),
        "drop_rate": sum(totals.dropped.values()) / max(1, totals.examples),
        "resumed_examples": resumed.examples,
        "seconds": round(seconds, 3),
        "examples_per_second": (totals.examples - resumed.examples) / max(seconds, 1e-9),
        "process_index": process_index,
        "process_count": process_count,
    }
    offline_jobs.write_atomically(
        os.path.join(output_dir, f"summary-{shard}.json"), json.dumps(summary, indent=1).encode()
    )
    _merge_summaries(output_dir, process_count)
    console.info(f"ssr-generate [{shard}] done: " + json.dumps(summary))
    return summary


def _count_examples(task_name, split, text_key, input_files, max_words, max_examples):
    """The number of examples, for the ETA: counted for text files, else max_examples (None
    when unknown, e.g. a large TFDS source without max_examples)."""
    if input_files:
        documents = read_documents(None, split, text_key, input_files)
        return sum(1 for _ in iterate_examples(documents, max_words, max_examples))
    return max_examples


def _log_progress(shard, number, totals: ChunkStats, done, shard_total, start_time) -> None:
    seconds = max(time.perf_counter() - start_time, 1e-9)
    rate = totals.examples / seconds
    dropped = sum(totals.dropped.values())
    eta = "?"
    if shard_total is not None and rate > 0:
        eta = f"{(shard_total - done) / rate:.0f}s"
    console.info(
        f"ssr-generate [{shard}] chunk {number}: {done}/{shard_total or '?'} examples, "
        f"{rate:.1f} examples/s, {totals.spans / seconds:.1f} spans/s, "
        f"{totals.generated_tokens / seconds:.0f} tokens/s, drop rate "
        f"{dropped / max(1, totals.examples):.1%} {dict(totals.dropped)}, ETA {eta}"
    )


def _merge_summaries(output_dir: str, process_count: int) -> None:
    """Writes summary.json once every process's summary exists (the last to finish does)."""
    paths = [
        os.path.join(output_dir, f"summary-{p:05d}-of-{process_count:05d}.json")
        for p in range(process_count)
    ]
    if not all(tf.io.gfile.exists(path) for path in paths):
        return
    merged = ChunkStats()
    for path in paths:
        with tf.io.gfile.GFile(path) as f:
            summary = json.load(f)
        merged.add(ChunkStats(**{k: summary[k] for k in dataclasses.asdict(merged)}))
    dropped = sum(merged.dropped.values())
    result = {
        **dataclasses.asdict(merged),
        "dropped_total": dropped,
        "drop_rate": dropped / max(1, merged.examples),
        "process_count": process_count,
    }
    offline_jobs.write_atomically(
        os.path.join(output_dir, "summary.json"), json.dumps(result, indent=1).encode()
    )
