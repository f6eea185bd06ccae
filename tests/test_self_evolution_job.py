"""The score-tokens job and the self-evolution task on CPU: a tiny model trained here scores
every token of bundled text once; the rows put each token in a masked span exactly once; the
scores equal the model's own cross-entropy; a SIGKILLed job resumes to the same records; and
training on the task with rectified label smoothing runs and lowers the loss."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_main import _env
from test_ssr_job import _main, _run
from test_ssr_job import _train as train_tiny

from e2s2_jax.data.corpus import BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.self_evolution import job, scoring

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_LAYER = ["--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1"]
NUM_EXAMPLES = 48
MAX_TOKENS = 64
PER_CHUNK = 4
SCORE = [
    "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin_file=gin/runs/score_tokens.gin",
    f"--gin.score_tokens.input_files=['{BUNDLED_VALIDATION_FILES[0]}']",
    f"--gin.score_tokens.max_examples={NUM_EXAMPLES}",
    f"--gin.score_tokens.max_tokens_per_example={MAX_TOKENS}",
    f"--gin.score_tokens.examples_per_chunk={PER_CHUNK}",
    "--gin.score_tokens.batch_size=16",
    *ONE_LAYER,
]


def _train(model_dir, task_flags, steps):
    return train_tiny(model_dir, task_flags, steps, batch_size=8)


def _records(output_dir) -> dict[int, dict]:
    records = {}
    for path in sorted(glob.glob(os.path.join(output_dir, job.RECORD_PATTERN))):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                assert record["example_id"] not in records, "example written twice"
                records[record["example_id"]] = record
    return records


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("scorer")
    _train(model_dir, ['--gin.MIXTURE_OR_TASK_NAME="bundled_span_corruption"'], 30)
    return str(model_dir)


@pytest.fixture(scope="module")
def scores_dir(checkpoint_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("scores")
    _run(
        _main(
            "score-tokens",
            *SCORE,
            f'--gin.SCORING_CHECKPOINT_DIR="{checkpoint_dir}"',
            f'--gin.SCORES_DIR="{output_dir}"',
        )
    )
    return str(output_dir)


def test_every_token_of_the_text_is_scored_once(scores_dir):
    vocabulary = get_vocabulary()
    expected = []
    for document in read_text_documents(BUNDLED_VALIDATION_FILES):
        tokens = vocabulary.encode(document)
        expected += [tokens[i : i + MAX_TOKENS] for i in range(0, len(tokens), MAX_TOKENS)]
        if len(expected) >= NUM_EXAMPLES:
            break
    records = _records(scores_dir)
    assert sorted(records) == list(range(NUM_EXAMPLES))
    for example_id, record in records.items():
        assert record["tokens"] == list(expected[example_id])
        scores = np.asarray(record["informativeness"])
        assert scores.shape == (len(record["tokens"]),)
        assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
    summary = json.loads(open(os.path.join(scores_dir, "summary-00000-of-00001.json")).read())
    assert summary["tokens"] == sum(len(r["tokens"]) for r in records.values())
    print(
        f"\nscore-tokens: {summary['tokens']} tokens, mean informativeness "
        f"{summary['mean_informativeness']:.3f} nats, {summary['tokens_per_second']:.0f} tokens/s"
    )


def test_scoring_rows_mask_every_token_once_in_t5_format():
    """NumPy check: round r's row restores the tokens (sentinel k -> target span k) and the
    targets' scored positions cover every position exactly once over the rounds."""
    vocab_size, eos = 1100, 1
    tokens = np.arange(10, 10 + 47)
    rows = scoring.scoring_rows(
        tokens, 0, span_length=3, num_rounds=7, vocab_size=vocab_size, eos_id=eos
    )
    assert len(rows) == 7
    covered = []
    for row in rows:
        spans, current = {}, None
        for token, position in zip(row.targets[:-1], row.scored_positions[:-1], strict=True):
            if token >= vocab_size - 100:
                current = token
                spans[current] = []
                assert position == -1
            else:
                spans[current].append(token)
                assert tokens[position] == token
                covered.append(position)
        restored = []
        for token in row.inputs[:-1]:
            restored += spans.pop(token) if token >= vocab_size - 100 else [token]
        assert restored == tokens.tolist() and not spans
        assert row.inputs[-1] == row.targets[-1] == eos
        masked = sum(1 for p in row.scored_positions if p >= 0)
        assert masked <= 9  # 47 tokens in 16 blocks: at most 3 blocks of 3 per round
    assert sorted(covered) == list(range(len(tokens)))
    assert scoring.sentinels_needed(47, 3, 7) == 3


def test_scores_equal_the_models_cross_entropy():
    """A random tiny model: the job's score of each token equals -log_softmax at the target,
    computed here in NumPy from the model's logits on the same row."""
    from e2s2_jax.models.config import T5Config
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.training import partitioning

    model = T5(
        T5Config(
            vocab_size=300,
            d_model=16,
            d_ff=32,
            num_heads=2,
            d_kv=8,
            num_encoder_layers=1,
            num_decoder_layers=1,
        )
    )
    rng = np.random.default_rng(0)
    examples = [rng.integers(3, 150, size=n).astype(np.int32) for n in (5, 23, 40)]
    dummy = np.ones((2, 8), np.int32)
    params = model.init(jax.random.key(0), dummy, dummy)["params"]
    mesh = partitioning.create_mesh(-1, 1, 1, devices=jax.devices()[:1])
    scorer = scoring.TokenScorer(model, params, mesh, partitioning.LOGICAL_AXIS_RULES)
    scores = scoring.score_examples(
        examples, scorer, batch_size=4, span_length=3, num_rounds=7, vocab_size=300, eos_id=1
    )
    for index, tokens in enumerate(examples):
        want = np.full(len(tokens), np.nan)
        for row in scoring.scoring_rows(
            tokens, index, span_length=3, num_rounds=7, vocab_size=300, eos_id=1
        ):
            targets = np.asarray([row.targets], np.int32)
            decoder_inputs = np.concatenate([[[0]], targets[:, :-1]], axis=1)
            logits = np.asarray(
                model.apply({"params": params}, jnp.asarray([row.inputs]), decoder_inputs, targets),
                np.float64,
            )[0]
            log_probs = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            for t, position in enumerate(row.scored_positions):
                if position >= 0:
                    want[position] = -log_probs[t, row.targets[t]]
        assert not np.any(np.isnan(want))
        # Padding to the batch's length does not change a row's logits beyond float32
        # rounding of sums of ~vocab-size terms of size ~log(vocab) (~6): 1e-4 nats.
        np.testing.assert_allclose(scores[index], want, rtol=0, atol=1e-4)


def test_sigkill_halfway_then_resume_gives_each_token_once(checkpoint_dir, scores_dir, tmp_path):
    output_dir = tmp_path / "resumed"
    command = _main(
        "score-tokens",
        *SCORE,
        f'--gin.SCORING_CHECKPOINT_DIR="{checkpoint_dir}"',
        f'--gin.SCORES_DIR="{output_dir}"',
    )
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if len(glob.glob(str(output_dir / job.RECORD_PATTERN))) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(glob.glob(str(output_dir / job.RECORD_PATTERN)))
    assert 3 <= committed < NUM_EXAMPLES // PER_CHUNK, "the kill must land halfway"

    result = _run(command)
    summary = json.loads((output_dir / "summary-00000-of-00001.json").read_text())
    assert summary["resumed_examples"] >= committed * PER_CHUNK
    assert summary["examples"] + summary["resumed_examples"] == NUM_EXAMPLES
    assert "resumed_examples" in result.stdout
    # Exactly the records of the uninterrupted run: none lost, none twice (_records checks).
    assert _records(output_dir) == _records(scores_dir)
    assert not glob.glob(str(output_dir / "*.tmp-*"))


def test_training_on_the_self_evolution_task_lowers_the_loss(scores_dir, tmp_path):
    model_dir = tmp_path / "continued"
    _train(
        model_dir,
        ["--gin_file=gin/objectives/self_evolution.gin", f'--gin.SCORES_DIR="{scores_dir}"'],
        30,
    )
    losses = {}
    with open(model_dir / "train_metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    assert all(np.isfinite(list(losses.values())))
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(26, 31)])
    assert last < first - 0.5, (first, last)
    config = (model_dir / "config.gin").read_text()
    assert "rectified_label_smoothing = 0.1" in config


def test_bad_settings_stop_with_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        _main(
            "score-tokens",
            "--gin_file=gin/models/t5_1_1_tiny.gin",
            "--gin_file=gin/runs/score_tokens.gin",
            f'--gin.SCORING_CHECKPOINT_DIR="{tmp_path}"',
            f'--gin.SCORES_DIR="{tmp_path / "scores"}"',
            f"--gin.score_tokens.input_files=['{BUNDLED_VALIDATION_FILES[0]}']",
            "--gin.score_tokens.num_rounds=1",
        ),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "num_rounds=1" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_informed_masking_of_real_scores_masks_harder_tokens(scores_dir):
    """The job's own scores through the task's preprocessor: masked tokens' mean cross-entropy
    against T5's random layouts (num_candidates=1) over 20 passes of the scored examples."""
    import seqio
    from test_informed_masking import masked_statistics

    from e2s2_jax.data import informed_masking
    from e2s2_jax.data.preprocessors import pretraining_output_features
    from e2s2_jax.self_evolution import tasks

    vocabulary = get_vocabulary()
    features = pretraining_output_features(vocabulary)
    files = sorted(glob.glob(os.path.join(scores_dir, job.RECORD_PATTERN)))
    records = list(tasks.records_dataset(files, "train", False).as_numpy_iterator())
    documents = [r["targets"] for r in records] * 20
    scores = [r["informativeness"] for r in records] * 20
    source = tasks.records_dataset(files, "train", False).repeat(20)
    figures = {}
    for name, candidates in (("random", 1), ("informed", 16)):
        with seqio.utils.map_seed_manager(7):
            outputs = informed_masking.informed_span_corruption(
                source, features, num_candidates=candidates
            )
        noise, spans, masked = masked_statistics(
            documents, scores, list(outputs.as_numpy_iterator()), vocabulary
        )
        figures[name] = {
            "density": noise / sum(map(len, documents)),
            "mean_span": noise / spans,
            "masked_informativeness": masked / noise,
        }
    all_scores = np.concatenate(scores)
    print(
        f"\nreal scores (mean {all_scores.mean():.3f}, sd {all_scores.std():.3f} nats): {figures}"
    )
    assert figures["informed"]["density"] == figures["random"]["density"]
    assert figures["informed"]["mean_span"] == figures["random"]["mean_span"]
    # Standard error of the random masked mean: sd / sqrt(masked tokens) (~0.04 nats here).
    standard_error = all_scores.std() / np.sqrt(noise)
    gain = (
        figures["informed"]["masked_informativeness"] - figures["random"]["masked_informativeness"]
    )
    assert gain > 5 * standard_error, (gain, standard_error)
