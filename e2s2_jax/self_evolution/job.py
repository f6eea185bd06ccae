"""The token-scoring job (`python -m e2s2_jax.main score-tokens`): a checkpoint scores every
token of a task's (or text files') documents and the job writes JSON-lines records
`{"example_id", "tokens", "informativeness"}` for `self_evolution.tasks`.

Documents are tokenized and cut into examples of at most `max_tokens_per_example` tokens, each
with a global id; process p of P takes the ids with `id % P == p`, in chunks of
`examples_per_chunk`. A chunk is committed by renaming its finished file into place, so a rerun
after a kill skips committed chunks and redoes the rest; scoring is deterministic, so a redone
chunk equals the lost one, and the output holds every token exactly once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence

import gin
import jax
import numpy as np
import tensorflow as tf

from e2s2_jax import offline_jobs
from e2s2_jax.console import console
from e2s2_jax.errors import ConfigError
from e2s2_jax.self_evolution import scoring
from e2s2_jax.ssr.job import read_documents
from e2s2_jax.training import partitioning
from e2s2_jax.training.checkpoints import restore_params
from e2s2_jax.training.input_pipeline import lookup_vocabulary

RECORD_PATTERN = "scores-*.jsonl"


def iterate_token_examples(
    documents: Iterator[str], vocabulary, max_tokens: int, max_examples: int | None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (global example id, int32 tokens) in order: each document's tokens cut into
    pieces of at most `max_tokens`; at most `max_examples`."""
    example_id = 0
    for document in documents:
        tokens = np.asarray(vocabulary.encode(document), np.int32)
        for start in range(0, len(tokens), max_tokens):
            if max_examples is not None and example_id >= max_examples:
                return
            yield example_id, tokens[start : start + max_tokens]
            example_id += 1


def record_lines(example_ids: Sequence[int], examples, scores) -> bytes:
    """The JSON lines of one chunk (informativeness rounded to 1e-5 nats)."""
    lines = [
        json.dumps(
            {
                "example_id": int(example_id),
                "tokens": tokens.tolist(),
                "informativeness": [round(float(x), 5) for x in score],
            }
        )
        for example_id, tokens, score in zip(example_ids, examples, scores, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode() if lines else b""


@gin.configurable(module="e2s2_jax")
def score_tokens(
    *,
    output_dir: str = gin.REQUIRED,
    checkpoint_dir: str = gin.REQUIRED,
    model=gin.REQUIRED,
    mixture_or_task_name: str | None = None,
    split: str = "train",
    text_key: str = "text",
    input_files: Sequence[str] | None = None,
    vocabulary_model: str | None = None,
    max_examples: int | None = None,
    max_tokens_per_example: int = 568,
    examples_per_chunk: int = 1024,
    batch_size: int = 64,
    span_length: int = 3,
    num_rounds: int = 7,
    checkpoint_step: int | None = None,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> dict:
    """Scores every token of a task's `split` (or `input_files`) with `model` restored from
    `checkpoint_dir` into `output_dir`; returns this process's summary.

    Writes `scores-PPPPP-of-QQQQQ-CCCCCC.jsonl` (process P of Q, chunk C) and
    `summary-PPPPP-of-QQQQQ.json`. A rerun resumes. Informativeness is the token's
    cross-entropy (nats) when masked in `span_length`-token spans, one block in `num_rounds`
    per pass (`scoring`).
    """
    if (mixture_or_task_name is None) == (not input_files):
        raise ConfigError(
            'score_tokens needs exactly one input: --gin.score_tokens.input_files=["a.txt"] or '
            '--gin.score_tokens.mixture_or_task_name=\\"a_task\\".'
        )
    if span_length < 1 or num_rounds < 2:
        raise ConfigError(
            f"score_tokens.span_length={span_length}, num_rounds={num_rounds}: use a span "
            "length of at least 1 and at least 2 rounds (3 and 7: T5's spans and density)."
        )
    vocabulary = lookup_vocabulary(mixture_or_task_name, vocabulary_model)
    needed = scoring.sentinels_needed(max_tokens_per_example, span_length, num_rounds)
    if needed > vocabulary.extra_ids:
        raise ConfigError(
            f"score_tokens.max_tokens_per_example={max_tokens_per_example} needs {needed} "
            f"sentinels per row but the vocabulary has {vocabulary.extra_ids}: lower it or "
            "raise num_rounds."
        )
    cfg = model.config
    process_index, process_count = jax.process_index(), jax.process_count()
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.job_mesh("score_tokens", mesh_shape, batch_size)
    tf.io.gfile.makedirs(output_dir)
    offline_jobs.check_job_config(
        output_dir,
        {
            "process_count": process_count,
            "examples_per_chunk": examples_per_chunk,
            "max_tokens_per_example": max_tokens_per_example,
            "max_examples": max_examples,
            "span_length": span_length,
            "num_rounds": num_rounds,
            "source": mixture_or_task_name or list(input_files),
            "split": split,
        },
        filename="score_tokens_job.json",
        job="a score-tokens job",
    )
    params = restore_params(checkpoint_dir, model, mesh, rules, checkpoint_step)
    scorer = scoring.TokenScorer(model, params, mesh, rules)
    shard = f"{process_index:05d}-of-{process_count:05d}"
    counts = {"examples": 0, "tokens": 0, "resumed_examples": 0, "resumed_tokens": 0}
    informativeness_sum = 0.0
    start_time = time.perf_counter()
    documents = read_documents(mixture_or_task_name, split, text_key, input_files)
    examples = iterate_token_examples(documents, vocabulary, max_tokens_per_example, max_examples)
    for number, chunk in offline_jobs.chunks(
        examples, process_index, process_count, examples_per_chunk
    ):
        path = os.path.join(output_dir, f"scores-{shard}-{number:06d}.jsonl")
        chunk_tokens = sum(len(tokens) for _, tokens in chunk)
        if tf.io.gfile.exists(path):  # committed before a kill: skip it
            counts["resumed_examples"] += len(chunk)
            counts["resumed_tokens"] += chunk_tokens
            continue
        example_ids = [example_id for example_id, _ in chunk]
        token_lists = [tokens for _, tokens in chunk]
        scores = scoring.score_examples(
            token_lists,
            scorer,
            batch_size=batch_size,
            span_length=span_length,
            num_rounds=num_rounds,
            vocab_size=vocabulary.vocab_size,
            eos_id=cfg.eos_id,
        )
        offline_jobs.write_atomically(path, record_lines(example_ids, token_lists, scores))
        counts["examples"] += len(chunk)
        counts["tokens"] += chunk_tokens
        informativeness_sum += float(sum(np.sum(s, dtype=np.float64) for s in scores))
        seconds = max(time.perf_counter() - start_time, 1e-9)
        console.info(
            f"score-tokens [{shard}] chunk {number}: {counts['examples']} examples scored, "
            f"{counts['tokens'] / seconds:.0f} tokens/s"
        )
    seconds = time.perf_counter() - start_time
    summary = {
        **counts,
        "mean_informativeness": informativeness_sum / max(counts["tokens"], 1),
        "seconds": round(seconds, 3),
        "tokens_per_second": counts["tokens"] / max(seconds, 1e-9),
        "process_index": process_index,
        "process_count": process_count,
    }
    offline_jobs.write_atomically(
        os.path.join(output_dir, f"summary-{shard}.json"), json.dumps(summary, indent=1).encode()
    )
    console.info(f"score-tokens [{shard}] done: " + json.dumps(summary))
    return summary
