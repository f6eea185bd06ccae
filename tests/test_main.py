"""The Gin trainer end to end: bitwise resume after kill -9, early configuration errors, eval
and infer outputs. Each run is a subprocess (`python -m e2s2_jax.main`), as users launch it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import eight_devices
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast run: the tiny model on short sequences.
SMALL_RUN = [
    "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin_file=gin/runs/pretrain.gin",
    "--gin_file=gin/runs/smoke.gin",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    "--gin.BATCH_SIZE=8",
    "--gin.train.log_every=1",
    "--gin.train.eval_every=0",
    "--gin.optax.warmup_cosine_decay_schedule.warmup_steps=1",
]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["XLA_FLAGS"] = eight_devices.xla_flags()
    return env


def _command(mode, model_dir, *extra):
    return [
        sys.executable,
        "-m",
        "e2s2_jax.main",
        mode,
        *SMALL_RUN,
        f'--gin.MODEL_DIR="{model_dir}"',
        *extra,
    ]


def _run(mode, model_dir, *extra, check=True):
    result = subprocess.run(
        _command(mode, model_dir, *extra),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def _losses(model_dir) -> dict[int, float]:
    """Loss per step from train_metrics.jsonl; a re-run step's later line wins."""
    losses = {}
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    return losses


def _final_params(model_dir, step):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.join(model_dir, "checkpoints", str(step), "state"))
    import jax

    # sigmaReparam's power-iteration vectors too, when the run has them.
    saved = {name: tree[name] for name in ("params", "model_state") if name in tree}
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(saved)
    }


@pytest.mark.parametrize(
    "extra",
    [(), ("--gin_file=gin/models/sigma_reparam.gin", "--gin.train.attention_entropy_every=3")],
    ids=["plain", "sigma_reparam+entropy"],
)
def test_resume_after_kill_9_is_bitwise(tmp_path, extra):
    straight = tmp_path / "straight"
    _run("train", straight, "--gin.TRAIN_STEPS=20", "--gin.train.checkpoint_every=20", *extra)

    resumed = tmp_path / "resumed"
    args = ("--gin.TRAIN_STEPS=20", "--gin.train.checkpoint_every=5", *extra)
    process = subprocess.Popen(
        _command("train", resumed, *args),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = resumed / "train_metrics.jsonl"
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and process.poll() is None:
        if metrics.exists():
            steps = _losses(resumed)
            if steps and max(steps) >= 11:
                process.send_signal(signal.SIGKILL)
                killed_after = max(steps)
                break
        time.sleep(0.05)
    process.wait()
    assert killed_after is not None and killed_after < 20, "the run was not killed mid-way"
    complete = sorted(int(p) for p in os.listdir(resumed / "checkpoints") if p.isdigit())
    # The newest *complete* one: a save still in flight at the kill does not count.
    assert complete and max(complete) <= killed_after, complete

    result = _run("train", resumed, *args)
    assert f"resumed from {resumed}/checkpoints/{max(complete)}" in result.stdout, result.stdout

    straight_losses, resumed_losses = _losses(straight), _losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 21))
    assert resumed_losses == straight_losses  # every step, bitwise (float32 -> JSON is exact)
    a, b = _final_params(straight, 20), _final_params(resumed, 20)
    assert a.keys() == b.keys()
    assert any("model_state" in name for name in a) == bool(extra)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_attention_entropy_is_written_every_interval_steps(tmp_path):
    """`train.attention_entropy_every=3` with `log_every=2`: the entropy of every layer kind is in
    train_metrics.jsonl at steps 3 and 6 (the loss beside it), in no other line; the log steps
    are still written."""
    model_dir = tmp_path / "run"
    _run(
        "train",
        model_dir,
        "--gin.TRAIN_STEPS=6",
        "--gin.train.log_every=2",
        "--gin.train.attention_entropy_every=3",
    )
    with open(model_dir / "train_metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    for record in records:
        entropies = {k: v for k, v in record.items() if k.startswith("attention_entropy/")}
        if record["step"] % 3:
            assert not entropies, record
            continue
        assert "loss" in record
        for kind in ("encoder_self", "decoder_self", "cross"):
            # Between 0 and log(keys): the tiny model's rows are at most 64 tokens.
            assert 0 < entropies[f"attention_entropy/{kind}"] <= np.log(64), record
            assert f"attention_entropy/{kind}/layer_1" in entropies


def test_sigma_reparam_from_a_plain_checkpoint_keeps_its_function_and_exports_w_hat(tmp_path):
    """Continued pretraining with sigmaReparam from a plain run (`INITIAL_CHECKPOINT`): the first
    step's loss (of the loaded weights) equals a plain continuation's; `convert export` of the
    sigmaReparam run writes W_hat = gamma / sigma * W, here recomputed in NumPy from the
    checkpoint's W, gamma and stored power-iteration vector."""
    import safetensors.numpy

    plain = tmp_path / "plain"
    _run("train", plain, "--gin.TRAIN_STEPS=3", "--gin.train.checkpoint_every=3")
    continued = {}
    for name, extra in (("plain", ()), ("sigma", ("--gin_file=gin/models/sigma_reparam.gin",))):
        model_dir = tmp_path / f"continued_{name}"
        _run(
            "train",
            model_dir,
            "--gin.TRAIN_STEPS=3",
            "--gin.train.checkpoint_every=3",
            f'--gin.train.initial_checkpoint="{plain}"',
            *extra,
        )
        continued[name] = _losses(model_dir)
    # W_hat = W up to a rounding of gamma / sigma (~1 ulp of every weight): the loss, a mean
    # over ~100 target tokens of log-softmaxes through 2 + 2 layers, moves by a few ulps.
    assert continued["sigma"][1] == pytest.approx(continued["plain"][1], rel=64 * 1.2e-7)
    # ... and training differs from there (step 1's learning rate is the warm-up's 0; step 2
    # is the first update, whose result step 3's loss sees).
    assert continued["sigma"][3] != continued["plain"][3]

    sigma_dir = tmp_path / "continued_sigma"
    hf_dir = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "e2s2_jax.main", "convert", "export"]
        + ["--params_dir", str(sigma_dir), "--hf_dir", str(hf_dir)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
    state = _final_params(sigma_dir, 3)
    prefix = "['params']['encoder']['layers_1']['mlp']['wo']"
    kernel = state[f"{prefix}['kernel']"].astype(np.float64)
    gamma = float(state[f"{prefix}['gamma']"])
    u = state["['model_state']['sigma_reparam']['encoder']['layers_1']['mlp']['wo']['u']"]
    v = u @ kernel
    v /= np.linalg.norm(v)
    u_next = kernel @ v
    u_next /= np.linalg.norm(u_next)
    w_hat = gamma / (u_next @ kernel @ v) * kernel
    hf_weight = exported["encoder.block.1.layer.1.DenseReluDense.wo.weight"]  # [out, in]
    assert not np.allclose(gamma / (u_next @ kernel @ v), 1.0, rtol=1e-6, atol=0)
    # float32 W_hat against float64: the sigma estimate sums ~in + out products (a few
    # dozen roundings of its scale), then one product per weight.
    np.testing.assert_allclose(hf_weight.T, w_hat, rtol=0, atol=64 * 1.2e-7 * np.abs(w_hat).max())


def test_sigterm_saves_before_exit(tmp_path):
    model_dir = tmp_path / "run"
    process = subprocess.Popen(
        _command("train", model_dir, "--gin.TRAIN_STEPS=1000", "--gin.train.checkpoint_every=500"),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    metrics = model_dir / "train_metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and _losses(model_dir)):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    # A preempted run is not a finished one: EX_TEMPFAIL, so a retry wrapper relaunches it.
    assert process.returncode == 75, stdout
    saved = sorted(int(p) for p in os.listdir(model_dir / "checkpoints") if p.isdigit())
    assert saved and 1 <= saved[-1] < 1000, saved
    assert f"SIGTERM: saving step {saved[-1]}" in stdout
    assert max(_losses(model_dir)) == saved[-1]


def _main_in_process(capsys, argv) -> tuple[int, str]:
    """`main.main(argv)` in this process (configuration errors need no subprocess)."""
    import gin

    from e2s2_jax import main

    gin.clear_config()
    try:
        code = main.main(argv)
    finally:
        gin.clear_config()
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--gin.trian.batch_size=8"], "No configurable matching 'trian'"),
        (["--gin.train.bach_size=8"], "doesn't have a parameter named 'bach_size'"),
        (["--gin.TRAIN_STEPS=%gin.REQUIRED"], "Missing required Gin macro(s) ['TRAIN_STEPS']"),
        (
            ["--gin.TRAIN_STEPS=5", "--gin.train.num_microbatches=3"],
            "set --gin.train.batch_size to a multiple of 3",
        ),
    ],
)
def test_configuration_errors_fail_before_training(tmp_path, capsys, extra, expected):
    code, stderr = _main_in_process(capsys, _command("train", tmp_path / "run", *extra)[3:])
    assert code == 2, stderr[-3000:]
    assert expected in stderr, stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_the_data_axis_does_not_divide(tmp_path):
    env = _env()
    env["XLA_FLAGS"] = eight_devices.xla_flags(8)
    result = subprocess.run(
        _command("train", tmp_path / "run", "--gin.TRAIN_STEPS=5", "--gin.BATCH_SIZE=12"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train.batch_size=12 is not divisible by 8 = data-parallel size 8" in result.stderr
    assert "set --gin.train.batch_size to a multiple of 8" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_model_dir_and_unwritable_model_dir(tmp_path, capsys):
    argv = [
        c
        for c in _command("train", "x", "--gin.TRAIN_STEPS=5")[3:]
        if not c.startswith("--gin.MODEL_DIR")
    ]
    code, stderr = _main_in_process(capsys, argv)
    assert code == 2 and "Missing required Gin macro(s) ['MODEL_DIR']" in stderr, stderr

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, stderr = _main_in_process(
        capsys, _command("train", blocker / "run", "--gin.TRAIN_STEPS=5")[3:]
    )
    assert code == 2
    assert f"MODEL_DIR='{blocker / 'run'}' is not writable" in stderr, stderr[-2000:]


TRAINED_STEPS = 4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run with an eval at step 4, for the tests that read one (each trainer
    process costs 15-20 s, so they share it)."""
    model_dir = tmp_path_factory.mktemp("trained") / "run"
    _run(
        "train",
        model_dir,
        f"--gin.TRAIN_STEPS={TRAINED_STEPS}",
        f"--gin.train.eval_every={TRAINED_STEPS}",
        "--gin.train.eval_batches=2",
    )
    return model_dir


def _infer(model_dir, inputs, *extra):
    """`main infer` of the tiny model in MODEL_DIR over the lines of `inputs`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "e2s2_jax.main",
            "infer",
            "--gin_file=gin/models/t5_1_1_tiny.gin",
            "--gin_file=gin/runs/infer.gin",
            f'--gin.MODEL_DIR="{model_dir}"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            f'--gin.infer.input_file="{inputs}"',
            *extra,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_eval_infer_outputs(trained_run, tmp_path):
    model_dir = trained_run
    for name in (
        "config.gin",
        "operative_config.gin",
        "params.txt",
        "train_metrics.jsonl",
        "eval_metrics.jsonl",
    ):
        assert (model_dir / name).exists(), name
    table = (model_dir / "params.txt").read_text()
    assert "token_embedder/embedding" in table and "('vocab', 'embed')" in table
    assert "total parameters:" in table
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(model_dir / "train"))
    operative = (model_dir / "operative_config.gin").read_text()
    assert (
        "train.train_steps = 4" in operative.replace("%TRAIN_STEPS", "4")
        or "TRAIN_STEPS = 4" in operative
    )

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("It is a truth universally acknowledged.\nEmma Woodhouse, handsome.\n")
    result = _infer(model_dir, inputs, "--gin.DecodeConfig.max_decode_length=8")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [
        json.loads(line) for line in (model_dir / "inference.jsonl").read_text().splitlines()
    ]
    assert [r["input"] for r in records] == inputs.read_text().splitlines()
    assert all(isinstance(r["prediction"], str) and np.isfinite(r["score"]) for r in records)


def test_infer_writes_one_record_per_input_line_in_order(trained_run, tmp_path):
    """Blank lines get an empty, marked prediction; an input over the length is marked
    truncated; a limit that cuts the input is said."""
    long_line = " ".join(["word"] * 200)  # far over 64 tokens
    lines = ["First line.", "", "Second line.", long_line, "   ", "Third.", "Cut by the limit."]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    result = _infer(
        trained_run,
        inputs,
        f'--gin.infer.output_file="{output}"',
        "--gin.infer.max_examples=6",
        "--gin.infer.batch_size=2",
        "--gin.DecodeConfig.max_decode_length=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["input"] for r in records] == lines[:6]
    for record, line in zip(records, lines, strict=False):
        if line.strip():
            assert "blank" not in record and np.isfinite(record["score"])
        else:
            assert record["blank"] is True and record["prediction"] == ""
            assert record["score"] is None
    assert [r["truncated"] for r in records] == [False, False, False, True, False, False]
    assert "more than infer.max_examples=6 inputs" in result.stdout
    assert "1 input(s) longer than TASK_FEATURE_LENGTHS['inputs']=64" in result.stdout


def test_initial_checkpoint_fills_new_heads_and_fine_tuning_drops_them(trained_run, tmp_path):
    pretrained = trained_run
    # Continued pretraining with E2S2 adds the denoising head: filled from its initializer.
    e2s2 = tmp_path / "e2s2"
    result = _run(
        "train",
        e2s2,
        "--gin_file=gin/objectives/e2s2.gin",
        '--gin.MIXTURE_OR_TASK_NAME="bundled_e2s2"',
        "--gin.TRAIN_STEPS=2",
        f'--gin.train.initial_checkpoint="{pretrained}"',
    )
    assert f"initialised from {pretrained}" in result.stdout
    assert "keep their initial values: head_denoise/" in result.stdout, result.stdout
    # Fine-tuning from the E2S2 run: its head is in the checkpoint but not in the model.
    finetuned = tmp_path / "finetuned"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2s2_jax.main",
            "train",
            "--gin_file=gin/models/t5_1_1_tiny.gin",
            "--gin_file=gin/runs/finetune.gin",
            f'--gin.MODEL_DIR="{finetuned}"',
            f'--gin.INITIAL_CHECKPOINT="{e2s2}"',
            '--gin.MIXTURE_OR_TASK_NAME="bundled_restore_case"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
            "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=4",
            "--gin.train.eval_every=0",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint entries unused by this model: head_denoise/" in result.stdout
    assert "not in the checkpoint" not in result.stdout  # every model parameter came from it
    params = _final_params(finetuned, 2)
    assert not any("head_" in name for name in params)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2s2_jax.main",
            "eval",
            "--gin_file=gin/models/t5_1_1_tiny.gin",
            "--gin_file=gin/runs/eval.gin",
            f'--gin.MODEL_DIR="{finetuned}"',
            '--gin.MIXTURE_OR_TASK_NAME="bundled_restore_case"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
            "--gin.BATCH_SIZE=4",
            "--gin.evaluate.eval_batches=1",
            "--gin.evaluate.max_decode_examples=4",
            "--gin.DecodeConfig.max_decode_length=8",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((finetuned / "eval_metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2
    assert 0 <= record["exact_match"] <= 100 and 0 <= record["word_accuracy"] <= 100
    assert np.isfinite(record["loss"])


def test_export_reads_a_train_run(trained_run, tmp_path):
    import safetensors.numpy

    from e2s2_jax.interop import hf, params_io

    model_dir = trained_run
    config, params = params_io.load_params(str(model_dir))
    assert (config.d_model, config.num_encoder_layers) == (64, 2)  # t5_1_1_tiny.gin
    # A plain run: the checkpoint's params are what export reads, under the same paths.
    saved = _final_params(model_dir, TRAINED_STEPS)
    expected = {k.removeprefix("['params']"): v for k, v in saved.items() if "['params']" in k}
    assert len(expected) == len(saved)  # no model_state in a plain run
    import jax

    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    assert flat.keys() == expected.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    hf.export_hf(config, params, str(tmp_path / "hf"))
    tensors = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["shared.weight"], params["token_embedder"]["embedding"])


def test_a_gin_import_line_registers_a_teams_own_tasks(tmp_path, monkeypatch):
    """README's way to train on your own task: a module that registers it, imported by a Gin
    file's `import` line; a module not on the path is a ConfigError naming the file and the
    fix, not a traceback."""
    import gin
    import seqio

    from e2s2_jax import main as entry
    from e2s2_jax.errors import ConfigError

    (tmp_path / "other_team_tasks.py").write_text(
        "from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES\n"
        "from e2s2_jax.data.vocab import get_vocabulary\n"
        "from tasks import register_text_task\n"
        "register_text_task('other_team_e2s2', {'train': BUNDLED_TRAIN_FILES, "
        "'validation': BUNDLED_VALIDATION_FILES}, 'e2s2', get_vocabulary())\n"
    )
    (tmp_path / "other_team.gin").write_text(
        "import other_team_tasks\nMIXTURE_OR_TASK_NAME = 'other_team_e2s2'\n"
    )
    (tmp_path / "missing.gin").write_text("import no_such_team_tasks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    files = ["gin/models/t5_1_1_tiny.gin", "gin/runs/pretrain.gin", "gin/runs/smoke.gin"]
    try:
        gin.clear_config()
        entry.parse_gin(
            "train", [*files, str(tmp_path / "other_team.gin")], ['MODEL_DIR = "/x"'], ""
        )
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "other_team_e2s2"
        task = seqio.get_mixture_or_task("other_team_e2s2")
        assert "inputs_noised" in task.output_features
        gin.clear_config()
        with pytest.raises(
            ConfigError, match=r"no_such_team_tasks(.|\n)*missing\.gin(.|\n)*PYTHONPATH"
        ):
            entry.parse_gin(
                "train", [*files, str(tmp_path / "missing.gin")], ['MODEL_DIR = "/x"'], ""
            )
    finally:
        gin.clear_config()
        seqio.TaskRegistry.remove("other_team_e2s2")
