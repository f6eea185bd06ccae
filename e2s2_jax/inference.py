"""The evaluate and infer jobs (`python -m e2s2_jax.main eval|infer`): a restored checkpoint's
objective metrics and a task's SeqIO metrics on decoded outputs; decoded predictions of a task
split or a text file's lines as JSON lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from e2s2_jax.console import console
from e2s2_jax.decoding import make_predict_fn
from e2s2_jax.errors import ConfigError
from e2s2_jax.interop import params_io
from e2s2_jax.training import partitioning
from e2s2_jax.training.checkpoints import restore_params
from e2s2_jax.training.eval_step import eval_metrics, make_eval_fns
from e2s2_jax.training.input_pipeline import (
    check_split,
    load_eval_batches,
    lookup_vocabulary,
    task_examples,
)
from e2s2_jax.training.metrics_writer import MetricsWriter


def _decode_texts(
    model, params, decode_config, vocabulary, token_batches, seed=0
) -> Iterator[tuple[str, float]]:
    """(text, score) of each row of `token_batches` (`[batch, length]` inputs), the best beam
    when beam search returns several; the text stops at eos."""
    predict = make_predict_fn(model, decode_config)
    rng = jax.random.key(seed)
    for i, tokens in enumerate(token_batches):
        result = jax.device_get(predict(params, jnp.asarray(tokens), jax.random.fold_in(rng, i)))
        tokens_out = np.asarray(result.tokens)
        scores = np.asarray(result.scores)
        if tokens_out.ndim == 3:  # beams: [batch, beams, length], best first
            tokens_out, scores = tokens_out[:, 0], scores[:, 0]
        for row, score in zip(tokens_out, scores, strict=True):
            ids = [int(t) for t in row if t not in (0,)]
            if model.config.eos_id in ids:
                ids = ids[: ids.index(model.config.eos_id)]
            yield vocabulary.decode(ids), float(score)


def pad_rows(rows: list[np.ndarray], length: int) -> np.ndarray:
    """`[len(rows), length]` int32 tokens: each row cut to `length`, then padded with 0."""
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : min(len(row), length)] = row[:length]
    return out


def target_text(example: Mapping, vocabulary) -> str:
    """A task example's target as text: its `targets_pretokenized`, else the decoded tokens."""
    if "targets_pretokenized" in example:
        return example["targets_pretokenized"].decode()
    return vocabulary.decode([int(t) for t in example["targets"] if t > 1])


@gin.configurable(module="e2s2_jax")
def evaluate(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model=gin.REQUIRED,
    objective=gin.REQUIRED,
    feature_converter=gin.REQUIRED,
    decode_config=gin.REQUIRED,
    batch_size: int = 32,
    split: str = "validation",
    checkpoint_step: int | None = None,
    eval_batches: int = 8,
    max_decode_examples: int = 64,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> dict[str, float]:
    """The objective's metrics on `split` and the task's SeqIO metrics on decoded outputs
    (the first `max_decode_examples` of the split, in order; -1: the whole split, 0: none).

    Writes them to MODEL_DIR/eval (TensorBoard) and eval_metrics.jsonl at the checkpoint's
    step, prints them, and returns them.
    """
    if jax.process_count() > 1:
        raise ConfigError("eval runs on one process; launch it without --num_processes.")
    check_split(mixture_or_task_name, split, "evaluate.split")
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.job_mesh("evaluate", mesh_shape)
    params = restore_params(model_dir, model, mesh, rules, checkpoint_step)
    step = checkpoint_step or params_io.newest_checkpoint_step(model_dir)
    batches = load_eval_batches(
        mixture_or_task_name,
        task_feature_lengths,
        split,
        batch_size,
        feature_converter,
        eval_batches,
        mesh,
        rules,
    )
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    results = eval_metrics(
        make_eval_fns(model, objective, mesh, rules, param_shardings), params, batches
    )

    task, examples = task_examples(
        mixture_or_task_name, split, task_feature_lengths, max_decode_examples
    )
    metric_fns = getattr(task, "predict_metric_fns", None) or getattr(task, "metric_fns", [])
    if metric_fns and examples:
        vocabulary = task.output_features["targets"].vocabulary
        rows = [e["inputs"] for e in examples]
        token_batches = [
            pad_rows(rows[i : i + batch_size], task_feature_lengths["inputs"])
            for i in range(0, len(rows), batch_size)
        ]
        decoded = _decode_texts(model, params, decode_config, vocabulary, token_batches)
        # SeqIO's convention: the task's postprocess_fn sees each output with its example
        # (e.g. an edit metric's target becomes {source, reference}).
        predictions = [
            task.postprocess_fn(text, example=example, is_target=False)
            for (text, _), example in zip(decoded, examples, strict=True)
        ]
        targets = [
            task.postprocess_fn(target_text(example, vocabulary), example=example, is_target=True)
            for example in examples
        ]
        for metric_fn in metric_fns:
            results.update({k: float(v) for k, v in metric_fn(targets, predictions).items()})
        for target, prediction in list(zip(targets, predictions, strict=True))[:3]:
            console.info(
                f"  target:     {str(target)[:100]}\n  prediction: {str(prediction)[:100]}"
            )
    console.info(
        f"eval of step {step} on {mixture_or_task_name}:{split}: "
        + " ".join(f"{k} {v:.4g}" for k, v in results.items())
    )
    _write_eval_metrics(model_dir, step or 0, results)
    return results


def _write_eval_metrics(model_dir: str, step: int, results: Mapping[str, float]) -> None:
    """Appends `results` to MODEL_DIR's eval metrics; a MODEL_DIR that cannot be written (a
    finished run made read-only) gets a warning, the metrics having been printed already."""
    try:
        writer = MetricsWriter(model_dir, "eval", enabled=jax.process_index() == 0)
        writer.write(step, results)
        writer.close()
    except (OSError, tf.errors.OpError) as error:
        console.warning(
            f"warning: eval metrics not written to {model_dir} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); they are printed above"
        )


@gin.configurable(module="e2s2_jax")
def infer(
    *,
    model_dir: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model=gin.REQUIRED,
    decode_config=gin.REQUIRED,
    output_file: str | None = None,
    mixture_or_task_name: str | None = None,
    input_file: str | None = None,
    vocabulary_model: str | None = None,
    split: str = "validation",
    batch_size: int = 32,
    max_examples: int = 1000,
    checkpoint_step: int | None = None,
    seed: int = 0,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> str:
    """Decodes a task's `split` inputs, or the lines of `input_file`, to JSON lines
    `{"input", "prediction", "score", "truncated"[, "target"][, "blank"]}` in `output_file`
    (default MODEL_DIR/inference.jsonl), one per input line and in order; returns its path.

    A blank input line gets an empty prediction, a null score and `"blank": true`; an input
    longer than `TASK_FEATURE_LENGTHS['inputs']` is cut to it, with `"truncated": true`. More
    inputs than `max_examples` are cut to it, with a warning.

    `input_file` lines are tokenized with `input_pipeline.lookup_vocabulary`'s choice:
    `vocabulary_model` (a SentencePiece file) when given, else the task's vocabulary when a task
    is named, else the bundled demo vocabulary. A task's own examples use the task's vocabulary.
    """
    if jax.process_count() > 1:
        raise ConfigError("infer runs on one process; launch it without --num_processes.")
    if mixture_or_task_name is None and input_file is None:
        raise ConfigError(
            'infer needs an input: --gin.infer.input_file=\\"lines.txt\\" or '
            '--gin.infer.mixture_or_task_name=\\"a_task\\".'
        )
    output_file = output_file or os.path.join(model_dir, "inference.jsonl")
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.job_mesh("infer", mesh_shape)
    length = task_feature_lengths["inputs"]
    if input_file is not None:
        lines = _read_input_lines(input_file)  # bad bytes fail before the restore
        params = restore_params(model_dir, model, mesh, rules, checkpoint_step)
        vocabulary = lookup_vocabulary(mixture_or_task_name, vocabulary_model)
        lines = _apply_limit(lines, max_examples, f"{input_file} has")
        rows = [np.asarray(vocabulary.encode(line) + [model.config.eos_id]) for line in lines]
        records = [
            {"input": line, "truncated": len(row) > length}
            for line, row in zip(lines, rows, strict=True)
        ]
    else:
        check_split(mixture_or_task_name, split, "infer.split")
        params = restore_params(model_dir, model, mesh, rules, checkpoint_step)
        task, examples = task_examples(
            mixture_or_task_name, split, task_feature_lengths, max_examples + 1
        )
        examples = _apply_limit(examples, max_examples, f"{mixture_or_task_name}:{split} has")
        vocabulary = task.output_features["targets"].vocabulary
        rows = [e["inputs"] for e in examples]
        records = [_task_record(e, vocabulary, length) for e in examples]
    # A blank line gets an empty prediction, marked, and is not decoded: output line i always
    # answers input line i.
    decode_rows = [
        row for row, record in zip(rows, records, strict=True) if record["input"].strip()
    ]
    token_batches = [
        pad_rows(decode_rows[i : i + batch_size], length)
        for i in range(0, len(decode_rows), batch_size)
    ]
    outputs = _decode_texts(model, params, decode_config, vocabulary, token_batches, seed)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    truncated = 0
    with open(output_file, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            if record["input"].strip():
                text, score = next(outputs)
                record = {**record, "prediction": text, "score": score}
            else:
                record = {**record, "prediction": "", "score": None, "blank": True}
            truncated += bool(record["truncated"])
            f.write(json.dumps(record) + "\n")
            if (i + 1) % (batch_size * 10) == 0:
                console.info(f"decoded {i + 1}/{len(records)}")
    if truncated:
        console.warning(
            f"warning: {truncated} input(s) longer than TASK_FEATURE_LENGTHS['inputs']={length} "
            'tokens were cut to it (their records say "truncated": true)'
        )
    console.info(f"wrote {len(records)} predictions to {output_file}")
    return output_file


def _read_input_lines(path: str) -> list[str]:
    """The lines of `path` (UTF-8, line ends removed); bad bytes are a ConfigError naming the
    line."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as error:
        raise ConfigError(
            f"infer.input_file={path!r}: {error.strerror}; give a readable text file."
        ) from error
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}:{number}: line is not UTF-8 ({error.reason} at byte {error.start}); "
                "fix or remove that line (infer writes one output line per input line)."
            ) from error
    return lines


def _apply_limit(items: list, max_examples: int, source: str) -> list:
    """`items` cut to `max_examples`, saying so when that cuts anything."""
    if len(items) > max_examples:
        console.warning(
            f"warning: {source} more than infer.max_examples={max_examples} inputs; decoding the "
            "first ones only (raise --gin.infer.max_examples to decode them all)"
        )
    return items[:max_examples]


def _task_record(example: Mapping, vocabulary, length: int) -> dict:
    """The output record of a task example, before its prediction: input, target, and whether
    the input was cut to `length` tokens (exact when the example keeps its text)."""
    record = {"input": vocabulary.decode([int(t) for t in example["inputs"] if t > 1])}
    if "inputs_pretokenized" in example:
        text = example["inputs_pretokenized"].decode()
        record["truncated"] = len(vocabulary.encode(text)) + 1 > length
    else:  # only the trimmed tokens: an input that fills the length may have been cut
        record["truncated"] = len(example["inputs"]) >= length
    if "targets" in example:
        record["target"] = vocabulary.decode([int(t) for t in example["targets"] if t > 1])
    return record
