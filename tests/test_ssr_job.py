"""SSR generation end to end on CPU: a tiny generator trained here fills spans of bundled text;
records restore the original text, malformed generations are counted and dropped, a SIGKILLed
job resumes to the same output, and a student's loss falls on the SSR task."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from test_main import _env

from e2s2_jax import offline_jobs
from e2s2_jax.data.corpus import BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.ssr import job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_LAYER = ["--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1"]
NUM_EXAMPLES = 160
MAX_WORDS = 40
GENERATE = [
    "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin_file=gin/runs/ssr_generate.gin",
    f"--gin.ssr_generate.input_files=['{BUNDLED_VALIDATION_FILES[0]}']",
    f"--gin.ssr_generate.max_examples={NUM_EXAMPLES}",
    "--gin.ssr_generate.examples_per_chunk=16",
    "--gin.ssr_generate.batch_size=16",
    f"--gin.ssr_generate.max_words_per_example={MAX_WORDS}",
    "--gin.ssr_generate.max_decode_length=48",
    *ONE_LAYER,
]


def _main(mode, *flags):
    return [sys.executable, "-m", "e2s2_jax.main", mode, *flags]


def _run(command):
    result = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def _train(model_dir, task_flags, steps, batch_size):
    return _run(
        _main(
            "train",
            "--gin_file=gin/models/t5_1_1_tiny.gin",
            "--gin_file=gin/runs/pretrain.gin",
            "--gin_file=gin/runs/smoke.gin",
            *task_flags,
            f'--gin.MODEL_DIR="{model_dir}"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            f"--gin.BATCH_SIZE={batch_size}",
            f"--gin.TRAIN_STEPS={steps}",
            "--gin.train.log_every=1",
            "--gin.train.eval_every=0",
            f"--gin.train.checkpoint_every={steps}",
            "--gin.optax.warmup_cosine_decay_schedule.warmup_steps=10",
            *ONE_LAYER,
        )
    )


def _records(output_dir) -> dict[int, dict]:
    files = sorted(glob.glob(os.path.join(output_dir, "ssr-*.tfrecord")))
    records = {}
    for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
        feature = tf.train.Example.FromString(serialized).features.feature
        example_id = feature["example_id"].int64_list.value[0]
        assert example_id not in records, f"example {example_id} written twice"
        records[example_id] = {
            "inputs": feature["inputs"].bytes_list.value[0].decode(),
            "targets": feature["targets"].bytes_list.value[0].decode(),
            "fill_score": feature["fill_score"].float_list.value[0],
            "fill_log_probs": list(feature["fill_log_probs"].float_list.value),
        }
    return records


def _restore(inputs: str, targets: str) -> str:
    """Substitutes target span k for `<extra_id_k> FILL_k <extra_id_k+1>` in the inputs."""
    originals = re.split(r" ?<extra_id_\d+> ?", targets)[1:-1]
    for k, original in enumerate(originals):
        pattern = rf"<extra_id_{k}> .+? <extra_id_{k + 1}>"
        inputs, count = re.subn(pattern, lambda _, o=original: o, inputs, count=1)
        assert count == 1, (k, inputs)
    assert "<extra_id_" not in inputs
    return inputs


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("generator")
    _train(model_dir, ['--gin.MIXTURE_OR_TASK_NAME="bundled_span_corruption"'], 300, 16)
    return str(model_dir)


@pytest.fixture(scope="module")
def ssr_output(generator_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ssr")
    _run(
        _main(
            "ssr-generate",
            *GENERATE,
            f'--gin.GENERATOR_DIR="{generator_dir}"',
            f'--gin.SSR_OUTPUT_DIR="{output_dir}"',
        )
    )
    return str(output_dir)


def test_records_restore_the_original_text(ssr_output):
    records = _records(ssr_output)
    with open(os.path.join(ssr_output, "summary.json")) as f:
        summary = json.load(f)
    windows = []
    for document in read_text_documents(BUNDLED_VALIDATION_FILES):
        windows += job.document_windows(document, MAX_WORDS)
        if len(windows) >= NUM_EXAMPLES:
            break
    corpus = "\n".join(read_text_documents(BUNDLED_VALIDATION_FILES))
    assert summary["examples"] == NUM_EXAMPLES
    assert summary["kept"] == len(records) > NUM_EXAMPLES // 4
    # The weak generator makes malformed outputs: they are counted, and absent from the output.
    assert summary["dropped_total"] == NUM_EXAMPLES - len(records) > 0
    assert summary["dropped_total"] == sum(summary["dropped"].values())
    assert set(records) <= set(range(NUM_EXAMPLES))
    for example_id, record in records.items():
        restored = _restore(record["inputs"], record["targets"])
        assert restored == windows[example_id]
        assert restored in corpus
        num_spans = record["targets"].count("<extra_id_") - 1
        assert len(record["fill_log_probs"]) == num_spans >= 1
        assert all(lp < 0 for lp in record["fill_log_probs"])
        assert record["fill_score"] == pytest.approx(np.mean(record["fill_log_probs"]), rel=1e-5)
        # Every fill is non-empty and sits between its two sentinels.
        for k in range(num_spans):
            fill = re.search(rf"<extra_id_{k}> (.*?) <extra_id_{k + 1}>", record["inputs"])
            assert fill and fill.group(1).strip()


def test_sigkill_halfway_then_resume_gives_each_example_once(generator_dir, ssr_output, tmp_path):
    output_dir = tmp_path / "resumed"
    command = _main(
        "ssr-generate",
        *GENERATE,
        f'--gin.GENERATOR_DIR="{generator_dir}"',
        f'--gin.SSR_OUTPUT_DIR="{output_dir}"',
    )
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if len(glob.glob(str(output_dir / "progress" / "*.json"))) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(glob.glob(str(output_dir / "progress" / "*.json")))
    assert 3 <= committed < NUM_EXAMPLES // 16, "the kill must land halfway"
    assert not (output_dir / "summary.json").exists()

    result = _run(command)
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["examples"] == NUM_EXAMPLES
    process_summary = json.loads((output_dir / "summary-00000-of-00001.json").read_text())
    assert process_summary["resumed_examples"] >= committed * 16
    assert "resumed_examples" in result.stdout
    # Exactly the records of the uninterrupted run: none lost, none twice (_records checks).
    assert _records(output_dir) == _records(ssr_output)
    assert not glob.glob(str(output_dir / "*.tmp-*"))


def test_student_loss_falls_on_the_ssr_task(ssr_output, tmp_path):
    model_dir = tmp_path / "student"
    _train(
        model_dir,
        ["--gin_file=gin/objectives/ssr.gin", f'--gin.SSR_RECORDS_DIR="{ssr_output}"'],
        40,
        8,
    )
    losses = {}
    with open(model_dir / "train_metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(36, 41)])
    assert last < first - 1.0, (first, last)


def test_parse_fills_accepts_whole_fills_and_rejects_malformed_rows():
    vocabulary = get_vocabulary()
    s = [vocabulary.vocab_size - 1 - k for k in range(4)]  # <extra_id_0..3>
    hello, world = vocabulary.encode("hello"), vocabulary.encode("big world")
    log_probs = np.linspace(-1.0, -2.0, 32)

    def parse(tokens, num_spans=2):
        row = np.zeros(32, np.int64)
        row[: len(tokens)] = tokens
        return job.parse_fills(row, log_probs, num_spans, vocabulary, eos_id=1)

    fills, scores = parse([s[0], *hello, s[1], *world, s[2], 1])
    assert fills == ["hello", "big world"]
    assert scores[0] == pytest.approx(np.mean(log_probs[1 : 1 + len(hello)]))
    start = 2 + len(hello)
    assert scores[1] == pytest.approx(np.mean(log_probs[start : start + len(world)]))
    # The last fill may end at eos instead of <extra_id_n>.
    assert parse([s[0], *hello, s[1], *world, 1])[0] == ["hello", "big world"]
    assert parse([s[0], *hello, s[2], *world, s[3], 1]) == "sentinel_missing"
    assert parse([*hello, s[0], *hello, s[1], *world, 1]) == "sentinel_missing"
    assert parse([s[0], *hello, 1]) == "sentinel_missing"
    assert parse([s[0], s[1], *world, s[2], 1]) == "empty_fill"
    assert parse([s[0], *hello, s[1], s[2], 1]) == "empty_fill"
    row_without_end = [s[0], *hello, s[1], *world * 20][:32]
    assert parse(row_without_end) == "truncated"
    assert parse([s[0], *hello, s[1], vocabulary.vocab_size + 3, s[2], 1]) == "invalid_token"


def _worker_eight_devices() -> dict:
    """Fills one batch with a random tiny model on a mesh of 8 data devices and on one device,
    with the same rng: the job's sharded sampling gives the same tokens."""
    from e2s2_jax.models.config import T5Config
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.training import partitioning

    model = T5(
        T5Config(
            vocab_size=8192,
            d_model=32,
            d_ff=64,
            num_heads=2,
            d_kv=16,
            num_encoder_layers=1,
            num_decoder_layers=1,
        )
    )
    tokens = np.random.default_rng(0).integers(2, 8000, size=(16, 24)).astype(np.int32)
    params = model.init(jax.random.key(0), tokens, tokens[:, :4])["params"]
    results = {}
    for name, devices in (("eight", jax.devices()), ("one", jax.devices()[:1])):
        mesh = partitioning.create_mesh(-1, 1, 1, devices=devices)
        generator = job.Generator(
            model,
            params,
            mesh,
            partitioning.LOGICAL_AXIS_RULES,
            batch_size=16,
            top_p=0.9,
            temperature=1.0,
            seed=3,
        )
        sampled, log_probs = generator(tokens, 12, first_example_id=5)
        results[name] = {"tokens": sampled.tolist(), "log_probs": log_probs.tolist()}
    results["devices"] = len(jax.devices())
    return results


def test_sampling_sharded_over_eight_devices_matches_one_device():
    import eight_devices

    report = eight_devices.run_worker(__file__, "eight_devices")
    assert report["devices"] == 8
    assert report["eight"]["tokens"] == report["one"]["tokens"]
    np.testing.assert_allclose(
        report["eight"]["log_probs"], report["one"]["log_probs"], rtol=1e-5, atol=1e-5
    )
    assert len({tuple(row) for row in report["one"]["tokens"]}) > 1  # rows sample differently


if __name__ == "__main__":
    print(json.dumps({"eight_devices": _worker_eight_devices}[sys.argv[1]]()))


def test_process_shards_cover_every_example_once():
    examples = [(i, f"text {i}") for i in range(103)]
    seen = []
    for process_index in range(3):
        chunks = list(offline_jobs.chunks(iter(examples), process_index, 3, size=8))
        assert [number for number, _ in chunks] == list(range(len(chunks)))
        assert all(len(chunk) == 8 for _, chunk in chunks[:-1])
        for _, chunk in chunks:
            assert all(i % 3 == process_index for i, _ in chunk)
            seen += [i for i, _ in chunk]
    assert sorted(seen) == list(range(103))


def test_resume_with_other_settings_is_refused(tmp_path):
    settings = {"process_count": 1, "examples_per_chunk": 16, "seed": 0}
    offline_jobs.check_job_config(str(tmp_path), settings)
    offline_jobs.check_job_config(str(tmp_path), settings)  # the same settings resume
    with pytest.raises(ValueError, match="process_count"):
        offline_jobs.check_job_config(str(tmp_path), {**settings, "process_count": 2})
