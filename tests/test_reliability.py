"""What the trainer does when a run goes wrong: a non-finite loss never reaches a checkpoint,
and one MODEL_DIR holds one run (a dead run's lock is taken over)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_main import _command, _env, _final_params, _losses

from e2s2_jax.training.run_lock import RunLock

TESTS = os.path.dirname(os.path.abspath(__file__))


def _exploding_run(tmp_path, model_dir, *extra):
    """A 40-step run whose learning rate is 1e30 from the 11th update on."""
    gin_file = tmp_path / "explode.gin"
    gin_file.write_text(
        "import exploding_lr\nLEARNING_RATE = @exploding_schedule()\n"
        "exploding_schedule.good_steps = 10\n"
    )
    env = _env()
    env["PYTHONPATH"] = TESTS + os.pathsep + env["PYTHONPATH"]
    return subprocess.run(
        _command(
            "train",
            model_dir,
            f"--gin_file={gin_file}",
            "--gin.TRAIN_STEPS=40",
            "--gin.train.checkpoint_every=10",
            *extra,
        ),
        cwd=os.path.dirname(TESTS),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _checkpoint_steps(model_dir) -> list[int]:
    return sorted(int(p) for p in os.listdir(model_dir / "checkpoints") if p.isdigit())


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    result = _exploding_run(tmp_path, model_dir, "--gin.train.skip_nonfinite_steps=2")
    assert result.returncode == 3, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    stopped = re.search(r"training stopped at step (\d+): loss (\S+), grad_norm", result.stderr)
    assert stopped, result.stderr[-3000:]
    stop_step = int(stopped.group(1))
    # skip_nonfinite_steps=2: two bad steps skipped (said), the third in a row stops the run.
    skipped = re.findall(r"step (\d+): non-finite loss .* update skipped", result.stdout)
    assert [int(s) for s in skipped] == [stop_step - 2, stop_step - 1], result.stdout
    assert 10 < stop_step - 2 < 40
    assert "3 non-finite step(s) in a row" in result.stderr
    assert f"the newest checkpoint, {model_dir}/checkpoints/10, is the last good state" in (
        result.stderr
    )
    # Only the checkpoint before the explosion exists, and it is finite; the run logged its
    # good steps.
    assert _checkpoint_steps(model_dir) == [10]
    params = _final_params(model_dir, 10)
    assert all(np.isfinite(value).all() for value in params.values())
    losses = _losses(model_dir)
    assert all(np.isfinite(losses[step]) for step in range(1, 11))


def test_the_train_step_never_applies_a_non_finite_update():
    """`nonfinite` is 1 and params and optimizer state are unchanged (bitwise) when the loss is
    not finite; a finite step updates them."""
    from e2s2_jax.models.config import T5Config
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    config = T5Config(
        vocab_size=32, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=1,
        num_decoder_layers=1, dropout_rate=0.0,
    )  # fmt: skip
    model = T5(config)
    optimizer = optax.adam(1e-2)
    mesh = partitioning.create_mesh(-1, 1, 1)
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = make_train_step(
        model, optimizer, Seq2SeqObjective(), mesh, state_shardings=shardings, donate_state=False
    )
    tokens = np.arange(1, 17, dtype=np.int32).reshape(2, 8) % 31 + 1
    batch = {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": np.roll(tokens, 1, axis=1),
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": np.ones_like(tokens, np.float32),
    }
    batch = partitioning.make_global_batch(batch, mesh, partitioning.LOGICAL_AXIS_RULES)
    rng = jax.random.key(1)

    good, metrics = step(state, batch, rng)
    assert float(metrics["nonfinite"]) == 0.0 and int(good.step) == 1
    assert not np.array_equal(
        np.asarray(good.params["token_embedder"]["embedding"]),
        np.asarray(state.params["token_embedder"]["embedding"]),
    )

    # A NaN in the embedding of a token the batch uses makes the loss NaN.
    poisoned_params = jax.tree.map(lambda x: x, good.params)
    embedding = poisoned_params["token_embedder"]["embedding"]
    poisoned_params["token_embedder"]["embedding"] = embedding.at[int(tokens[0, 0]), 0].set(jnp.nan)
    poisoned = good.replace(params=poisoned_params)
    after, metrics = step(poisoned, batch, rng)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 2  # the step still counts: the data position moves on
    for before_leaf, after_leaf in zip(
        jax.tree.leaves((poisoned.params, poisoned.opt_state)),
        jax.tree.leaves((after.params, after.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(after_leaf), np.asarray(before_leaf))


def test_a_dead_runs_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom e2s2_jax.training.run_lock import RunLock\n"
            # Held in a name: a collected RunLock closes its file, which drops the lock.
            f"lock = RunLock({str(tmp_path)!r})\nlock.acquire()\nprint('locked', flush=True)\n"
            "time.sleep(600)",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = RunLock(str(tmp_path))
        try:
            refused.acquire()
            raise AssertionError("a second lock was granted while the first holder lives")
        except Exception as error:  # RunLockedError, a ConfigError: exit status 2 in main
            assert f"in use by another run (pid {holder.pid} on" in str(error), error
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path))
    message = lock.acquire()
    assert message and f"no longer running (pid {holder.pid} on" in message, message
    lock.release()
    # A cleanly released lock is not reported as taken over.
    again = RunLock(str(tmp_path))
    assert again.acquire() is None
    again.release()
