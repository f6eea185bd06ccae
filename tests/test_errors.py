"""Bad input at every entry point: exit status 2, one message naming the cause, no traceback.

The configuration checks run in this process (`main.main`, as the command line calls it; they
fail before any work). Every entry point also runs as a subprocess, as users launch it, over
the inputs that only show at run time.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import eight_devices
import pytest
from test_main import _main_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [
    "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin_file=gin/runs/pretrain.gin",
    "--gin_file=gin/runs/smoke.gin",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
]


def _team_module(directory, name: str, train_files: str) -> str:
    """A team's task module (registering `name` over `train_files`) and a Gin file importing
    it; returns the Gin file's path."""
    (directory / f"{name}.py").write_text(
        "from e2s2_jax.data.vocab import get_vocabulary\n"
        "from tasks import register_text_task\n"
        f"register_text_task({name!r}, {{'train': {train_files!r}, 'validation': "
        f"{train_files!r}}}, 'span_corruption', get_vocabulary())\n"
    )
    gin_file = directory / f"{name}.gin"
    gin_file.write_text(f"import {name}\nMIXTURE_OR_TASK_NAME = {name!r}\n")
    return str(gin_file)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (['--gin.TRAIN_STEPS="ten"'], "TRAIN_STEPS (read by train.train_steps) = 'ten'"),
        (["--gin.BATCH_SIZE=-8"], "BATCH_SIZE (read by train.batch_size) = -8: must be an"),
        (["--gin.BATCH_SIZE=0"], "BATCH_SIZE (read by train.batch_size) = 0: must be an"),
        (["--gin.train.checkpoint_every=0"], "train.checkpoint_every = 0: must be an integer"),
        (["--gin.train.log_every=0"], "train.log_every = 0: must be an integer >= 1"),
        (
            ["--gin.train.attention_entropy_every=-1"],
            "train.attention_entropy_every = -1: must be an integer >= 0",
        ),
        (["--gin.TRAIN_STEP=10"], "--gin.TRAIN_STEP (did you mean TRAIN_STEPS?): no binding"),
    ],
)
def test_bad_train_settings_fail_before_any_work(tmp_path, capsys, extra, expected):
    argv = ["train", *RUN, f'--gin.MODEL_DIR="{tmp_path / "run"}"', "--gin.TRAIN_STEPS=5"]
    code, stderr = _main_in_process(capsys, [*argv, *extra])
    assert code == 2, stderr[-3000:]
    assert expected in stderr, stderr[-3000:]
    assert "In call to configurable" not in stderr  # Gin's notes are dropped: one line
    assert not (tmp_path / "run").exists()


def test_bad_eval_and_infer_settings(tmp_path, capsys):
    common = ["--gin_file=gin/models/t5_1_1_tiny.gin", f'--gin.MODEL_DIR="{tmp_path}"']
    lengths = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"
    code, stderr = _main_in_process(
        capsys,
        [
            "eval",
            *common,
            "--gin_file=gin/runs/eval.gin",
            lengths,
            "--gin.BATCH_SIZE=0",
            '--gin.MIXTURE_OR_TASK_NAME="bundled_span_corruption"',
        ],  # fmt: skip
    )
    assert code == 2 and "(read by evaluate.batch_size) = 0: must be an integer" in stderr, stderr
    # -1 decodes the whole split (the study's evaluations pass it; their printed commands must
    # replay from a shell); below that is refused.
    eval_argv = ["eval", *common, "--gin_file=gin/runs/eval.gin", lengths]
    eval_argv.append('--gin.MIXTURE_OR_TASK_NAME="bundled_span_corruption"')
    code, stderr = _main_in_process(capsys, [*eval_argv, "--gin.evaluate.max_decode_examples=-2"])
    assert code == 2 and "max_decode_examples = -2: must be an integer >= -1" in stderr, stderr
    code, stderr = _main_in_process(capsys, [*eval_argv, "--gin.evaluate.max_decode_examples=-1"])
    assert code == 2 and "must be an integer" not in stderr and "checkpoint" in stderr, stderr
    code, stderr = _main_in_process(
        capsys,
        ["infer", *common, "--gin_file=gin/runs/infer.gin", lengths, "--gin.infer.max_examples=0"],
    )
    assert code == 2 and "infer.max_examples = 0: must be an integer >= 1" in stderr, stderr
    # A split the task lacks is named with the task's splits, before any checkpoint is read.
    tasks = {
        "eval": '--gin.MIXTURE_OR_TASK_NAME="downstream_wiki_topic"',
        "infer": '--gin.infer.mixture_or_task_name="downstream_wiki_topic"',
    }
    for mode, setting in (("eval", "evaluate.split"), ("infer", "infer.split")):
        gin_file = f"--gin_file=gin/runs/{mode}.gin"
        argv = [mode, *common, gin_file, lengths, tasks[mode], f'--gin.{setting}="dev"']
        code, stderr = _main_in_process(capsys, argv)
        expected = (
            f"{setting}='dev': downstream_wiki_topic has no such split; choose one of "
            "['test', 'train', 'validation']"
        )
        assert code == 2 and expected in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("problem", ["empty", "no_match"])
def test_a_team_module_with_bad_data_names_the_file(tmp_path, capsys, monkeypatch, problem):
    """A data error raised while Gin imports a task module is that error, located at the
    `import` line, without Gin's hint about misspelt configurables."""
    if problem == "empty":
        (tmp_path / "empty.txt").write_text("")
        files, expected = str(tmp_path / "empty.txt"), "empty.txt is empty"
    else:
        files, expected = str(tmp_path / "none-*.txt"), "none-*.txt' matches no file"
    name = f"team_{problem}_tasks"
    gin_file = _team_module(tmp_path, name, files)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["train", *RUN, f"--gin_file={gin_file}", f'--gin.MODEL_DIR="{tmp_path / "run"}"']
    code, stderr = _main_in_process(capsys, argv)
    assert code == 2, stderr
    assert expected in stderr and f"(raised by `import {name}` in {gin_file}, line 1)" in stderr
    assert "Check the spelling" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# ----------------------------------------------------------------------------- subprocesses


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, str(tmp_path), env.get("PYTHONPATH", "")])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["XLA_FLAGS"] = eight_devices.xla_flags()
    return env


def _fails_cleanly(tmp_path, command: list[str], expected: str, status: int = 2) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return result.stderr


def test_train_on_a_truncated_gzip_corpus(tmp_path):
    # Small enough that the first batches read past the cut (the shuffle buffer alone does).
    lines = "".join(f"document {i} with a few words of text in it\n" for i in range(400))
    data = gzip.compress(lines.encode())
    (tmp_path / "part.txt.gz").write_bytes(data[: len(data) * 6 // 10])
    gin_file = _team_module(tmp_path, "team_truncated_tasks", str(tmp_path / "part.txt.gz"))
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.main", "train", *RUN, f"--gin_file={gin_file}", "--gin.TRAIN_STEPS=60",
         "--gin.BATCH_SIZE=8", f'--gin.MODEL_DIR="{tmp_path / "run"}"'],
        "part.txt.gz: the gzip data is truncated or damaged after",
    )  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints"
    )


def test_a_second_run_on_a_model_dir_in_use_is_refused(tmp_path):
    from e2s2_jax.training.run_lock import RunLock

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    lock = RunLock(str(model_dir))
    assert lock.acquire() is None
    try:
        stderr = _fails_cleanly(
            tmp_path,
            ["e2s2_jax.main", "train", *RUN, "--gin.TRAIN_STEPS=100",
             f'--gin.MODEL_DIR="{model_dir}"'],
            f"is in use by another run (pid {os.getpid()} on",
        )  # fmt: skip
    finally:
        lock.release()
    assert "choose another --gin.MODEL_DIR" in stderr
    assert not (model_dir / "checkpoints").exists()


def test_eval_and_ssr_generate_on_a_directory_without_checkpoints(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.main", "eval", "--gin_file=gin/models/t5_1_1_tiny.gin",
         "--gin_file=gin/runs/eval.gin", f'--gin.MODEL_DIR="{empty}"',
         '--gin.MIXTURE_OR_TASK_NAME="bundled_span_corruption"',
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"],
        f"{empty} holds no parameters",
    )  # fmt: skip
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.main", "ssr-generate", "--gin_file=gin/models/t5_1_1_tiny.gin",
         "--gin_file=gin/runs/ssr_generate.gin", f'--gin.GENERATOR_DIR="{empty}"',
         f'--gin.SSR_OUTPUT_DIR="{tmp_path / "records"}"',
         '--gin.ssr_generate.mixture_or_task_name="bundled_span_corruption"'],
        f"{empty} holds no parameters",
    )  # fmt: skip


def test_infer_on_an_input_file_that_is_not_utf8(tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_bytes(b"a good line\nanother\n\xff\xfe broken\n")
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.main", "infer", "--gin_file=gin/models/t5_1_1_tiny.gin",
         "--gin_file=gin/runs/infer.gin", f'--gin.MODEL_DIR="{tmp_path}"',
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
         f'--gin.infer.input_file="{inputs}"'],
        f"{inputs}:3: line is not UTF-8",
    )  # fmt: skip


def test_study_render_without_results(tmp_path):
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.study", "--render", "--out", str(tmp_path / "nothing")],
        "results.json does not exist; run the study first",
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_fixtures import make_hf_t5

    directory = tmp_path_factory.mktemp("hf")
    make_hf_t5(str(directory), "1.1")
    return directory


def _copy_of(source, destination):
    destination.mkdir()
    for name in os.listdir(source):
        (destination / name).write_bytes((source / name).read_bytes())
    return destination


def _edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    for name, value in fields.items():
        if value is None:
            del config[name]
    (directory / "config.json").write_text(json.dumps(config))


def test_convert_bad_checkpoints(hf_dir, tmp_path):
    """`interop.hf import|export` and `main convert`: each damage is one line, exit status 2."""
    missing_field = _copy_of(hf_dir, tmp_path / "missing_field")
    _edit_config(missing_field, d_model=None)
    truncated = _copy_of(hf_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    mismatch = _copy_of(hf_dir, tmp_path / "mismatch")
    _edit_config(mismatch, d_ff=64)
    missing_shard = _copy_of(hf_dir, tmp_path / "missing_shard")
    (missing_shard / "model.safetensors").unlink()
    (missing_shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}})
    )
    cases = [
        (missing_field, "required field 'd_model' is missing"),
        (truncated, "model.safetensors: not a readable safetensors file"),
        (mismatch, "has shape (48, 32)"),
        (missing_shard, "model-00001-of-00002.safetensors: listed in"),
    ]
    for directory, expected in cases:
        _fails_cleanly(
            tmp_path,
            ["e2s2_jax.interop.hf", "import", "--hf_dir", str(directory),
             "--output_dir", str(tmp_path / "out")],
            expected,
        )  # fmt: skip
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.main", "convert", "import", "--hf_dir", str(truncated),
         "--output_dir", str(tmp_path / "out")],
        "not a readable safetensors file",
    )  # fmt: skip
    _fails_cleanly(
        tmp_path,
        ["e2s2_jax.interop.hf", "export", "--params_dir", str(tmp_path / "no_params"),
         "--hf_dir", str(tmp_path / "hf_out")],
        str(tmp_path / "no_params"),
    )  # fmt: skip
