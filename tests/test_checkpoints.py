"""Train checkpoints: checksums and the fallback from a damaged one, failed asynchronous saves,
the refusal to save a non-finite state; `load_params_into`: partial restore into a model's
params, from relative and absolute paths."""

from __future__ import annotations

import errno
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from e2s2_jax.interop import params_io
from e2s2_jax.training.checkpoints import (
    CHECKSUMS_NAME,
    CheckpointError,
    NonFiniteStateError,
    TrainCheckpointer,
    load_params_into,
    verify_checksums,
)
from e2s2_jax.training.train_state import TrainState


def _save_params_dir(directory, params):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(directory), "params"), params)


@pytest.mark.parametrize("relative", [True, False])
def test_load_params_into_keeps_new_and_ignores_dropped(tmp_path, monkeypatch, relative):
    rng = np.random.default_rng(0)
    stored = {
        "encoder": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
        "head_denoise": {"kernel": rng.normal(size=(3, 3)).astype(np.float32)},
    }
    _save_params_dir(tmp_path / "pretrained", stored)
    init = {
        "encoder": {"kernel": np.zeros((4, 3), np.float32)},
        "fusion": {"scale": np.ones((3,), np.float32)},
    }
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, init)
    monkeypatch.chdir(tmp_path)
    path = "pretrained" if relative else str(tmp_path / "pretrained")

    params, filled, ignored = load_params_into(path, init, shardings)

    np.testing.assert_array_equal(
        np.asarray(params["encoder"]["kernel"]), stored["encoder"]["kernel"]
    )
    np.testing.assert_array_equal(np.asarray(params["fusion"]["scale"]), init["fusion"]["scale"])
    assert filled == ["fusion/scale"]
    assert ignored == ["head_denoise/kernel"]


def test_load_params_into_names_a_directory_without_params(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no parameters"):
        load_params_into(str(tmp_path / "empty"), {}, {})


def test_load_params_into_names_the_old_3d_attention_layout(tmp_path):
    # Written before 2026-12-02: [embed, heads, kv] query and a scanned [layers, heads, kv,
    # embed] output kernel; the model now stores [embed, heads * kv] / [layers, heads * kv,
    # embed]. A plain size mismatch gets the generic message only.
    old = {
        "query": {"kernel": np.zeros((8, 2, 4), np.float32)},
        "out": {"kernel": np.zeros((3, 2, 4, 8), np.float32)},
    }
    _save_params_dir(tmp_path / "old", old)
    init = {
        "query": {"kernel": np.zeros((8, 8), np.float32)},
        "out": {"kernel": np.zeros((3, 8, 8), np.float32)},
    }
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, init)
    with pytest.raises(
        CheckpointError, match=r"query/kernel: checkpoint \(8, 2, 4\).*\[embed, heads, kv\]"
    ):
        load_params_into(str(tmp_path / "old"), init, shardings)
    init["query"]["kernel"] = np.zeros((8, 9), np.float32)
    init["out"]["kernel"] = np.zeros((3, 2, 4, 8), np.float32)
    with pytest.raises(CheckpointError, match="do not fit") as error:
        load_params_into(str(tmp_path / "old"), init, shardings)
    assert "heads, kv" not in str(error.value)


# ----------------------------------------------------------------------------- train checkpoints

OPTIMIZER = optax.adam(1e-3)


def _state(step: int) -> TrainState:
    """A small TrainState whose values depend on `step` (random: the arrays' files do not
    compress to a few bytes)."""
    kernel_key, bias_key = jax.random.split(jax.random.key(step))
    params = {
        "dense": {
            "kernel": jax.random.normal(kernel_key, (64, 32), jnp.float32),
            "bias": jax.random.normal(bias_key, (32,), jnp.float32),
        }
    }
    return TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state=OPTIMIZER.init(params)
    )


def _shardings(state: TrainState) -> TrainState:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: sharding, state)


def _restore(checkpointer: TrainCheckpointer, step=None):
    state = _state(0)
    abstract = jax.eval_shape(lambda: state)
    return checkpointer.restore(abstract, _shardings(state), jax.random.key(0), step=step)


def _saved(directory, steps, keep=3) -> TrainCheckpointer:
    checkpointer = TrainCheckpointer(directory, keep=keep)
    for step in steps:
        assert checkpointer.save(_state(step), jax.random.key(step), {"batches": step})
    checkpointer.wait()
    return checkpointer


def _largest_array_file(step_dir) -> str:
    """The biggest TensorStore data file of a step: it holds the arrays' bytes."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(root) == "d"
    ]
    return max(files, key=os.path.getsize)


def _invert_64_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(64)
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(255 - b for b in block))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    # MODEL_DIR="run" from a shell: Orbax refuses a relative path when it writes the arrays.
    monkeypatch.chdir(tmp_path)
    checkpointer = _saved("run/checkpoints", [1])
    assert checkpointer.directory == tmp_path / "run" / "checkpoints"
    assert verify_checksums(tmp_path / "run" / "checkpoints" / "1")
    state, _, data_position = _restore(TrainCheckpointer("run/checkpoints"))
    assert int(state.step) == 1 and data_position == {"batches": 1}
    np.testing.assert_array_equal(
        np.asarray(state.params["dense"]["bias"]), np.asarray(_state(1).params["dense"]["bias"])
    )


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    checkpointer = _saved(directory, [1, 2])
    assert verify_checksums(directory / "2")
    _invert_64_bytes(_largest_array_file(directory / "2"))

    with caplog.at_level(logging.WARNING, logger="e2s2_jax.training.checkpoints"):
        state, _, data_position = _restore(checkpointer)

    assert int(state.step) == 1 and data_position == {"batches": 1}
    np.testing.assert_array_equal(
        np.asarray(state.params["dense"]["kernel"]), np.asarray(_state(1).params["dense"]["kernel"])
    )
    warnings = [r.getMessage() for r in caplog.records if r.name.endswith("checkpoints")]
    assert len(warnings) == 1, warnings
    assert f"{directory / '2'} is damaged" in warnings[0] and "differs" in warnings[0]
    # Set aside, so that the run saves step 2 again.
    assert os.path.isdir(directory / "2.damaged") and not os.path.exists(directory / "2")
    assert checkpointer.all_steps() == [1]
    assert checkpointer.save(_state(2), jax.random.key(2), {"batches": 2})
    checkpointer.close()


@pytest.mark.parametrize("checksums", [True, False])
def test_truncated_array_file_is_a_checkpoint_error(tmp_path, checksums):
    directory = tmp_path / "checkpoints"
    checkpointer = _saved(directory, [3])
    if not checksums:  # a checkpoint written before checksums existed
        os.remove(directory / "3" / CHECKSUMS_NAME)
    _truncate(_largest_array_file(directory / "3"))

    with pytest.raises(CheckpointError, match=str(directory / "3")) as error:
        _restore(checkpointer)
    assert ("bytes" if checksums else "damaged") in str(error.value)
    assert os.path.isdir(directory / "3")  # nothing usable to fall back to: left where it is
    checkpointer.close()


def test_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    checkpointer = _saved(directory, [4])
    os.remove(directory / "4" / CHECKSUMS_NAME)
    with caplog.at_level(logging.WARNING, logger="e2s2_jax.training.checkpoints"):
        state, _, _ = _restore(checkpointer)
    assert int(state.step) == 4
    assert f"{directory / '4'} has no {CHECKSUMS_NAME}" in caplog.text
    assert "unverified" in caplog.text
    checkpointer.close()


def test_load_params_into_verifies_a_train_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    _saved(model_dir / "checkpoints", [5]).close()
    init = _state(0).params
    shardings = _shardings(_state(0)).params
    params, _, _ = load_params_into(str(model_dir), init, shardings)
    np.testing.assert_array_equal(
        np.asarray(params["dense"]["kernel"]), np.asarray(_state(5).params["dense"]["kernel"])
    )

    _invert_64_bytes(_largest_array_file(model_dir / "checkpoints" / "5"))
    with pytest.raises(CheckpointError, match=f"{model_dir / 'checkpoints' / '5'} is damaged"):
        load_params_into(str(model_dir), init, shardings)


def test_restore_reads_no_missing_checkpoint_metadata(tmp_path, caplog):
    # Orbax's `Checkpointer.metadata` on `<step>/state` looked for the step's
    # `_CHECKPOINT_METADATA` inside the item directory and logged that it did not exist.
    model_dir = tmp_path / "run"
    checkpointer = _saved(model_dir / "checkpoints", [6])
    (model_dir / params_io.CONFIG_NAME).write_text("{}")
    with caplog.at_level(logging.INFO):
        _restore(checkpointer)
        load_params_into(str(model_dir), _state(0).params, _shardings(_state(0)).params)
        params_io.load_params(str(model_dir))
    assert "Metadata file does not exist" not in caplog.text
    assert "_CHECKPOINT_METADATA" not in caplog.text
    checkpointer.close()


def test_failed_async_save_raises_once_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    checkpointer = _saved(directory, [10], keep=1)

    async def disk_full(self, item, directory):  # the data item's write, in the background
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    assert checkpointer.save(_state(20), jax.random.key(20), {"batches": 20})
    deadline = time.time() + 60
    while checkpointer.manager.is_saving_in_progress() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointError) as error:
        checkpointer.check_finished_save()
    message = str(error.value)
    assert "step 20" in message and str(directory / "20") in message
    assert "No space left on device" in message and "kept (steps [10])" in message
    assert checkpointer.check_finished_save() is None  # raised once

    # With keep=1 the failed save was to prune step 10: it is still there, and restores.
    assert checkpointer.all_steps() == [10] and verify_checksums(directory / "10")
    assert int(_restore(checkpointer)[0].step) == 10
    monkeypatch.undo()
    assert checkpointer.save(_state(30), jax.random.key(30), {"batches": 30})
    checkpointer.close()
    assert checkpointer.all_steps() == [30] and verify_checksums(directory / "30")


def test_check_finished_save_writes_the_checksums(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = TrainCheckpointer(directory)
    assert checkpointer.check_finished_save() is None
    checkpointer.save(_state(7), jax.random.key(7), {"batches": 7})
    deadline = time.time() + 60
    finished = None
    while finished is None and time.time() < deadline:
        finished = checkpointer.check_finished_save()
        time.sleep(0.01)
    assert finished == 7
    checkpointer.wait()  # the checksums are written in the background
    assert verify_checksums(directory / "7")
    checkpointer.close()


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_save_refuses_a_non_finite_state(tmp_path, where):
    directory = tmp_path / "checkpoints"
    checkpointer = _saved(directory, [1])
    state = _state(2)
    if where == "params":
        state = state.replace(
            params={"dense": {**state.params["dense"], "bias": jnp.full(32, jnp.nan)}}
        )
        name = "['params']['dense']['bias']"
    else:
        adam, rest = state.opt_state[0], state.opt_state[1:]
        mu = {
            "dense": {
                **adam.mu["dense"],
                "kernel": adam.mu["dense"]["kernel"].at[3, 4].set(jnp.inf),
            }
        }
        state = state.replace(opt_state=(adam._replace(mu=mu), *rest))
        name = "mu['dense']['kernel']"
    with pytest.raises(NonFiniteStateError, match="NaN or Inf") as error:
        checkpointer.save(state, jax.random.key(2), {"batches": 2})
    assert name in str(error.value)
    checkpointer.close()
    assert checkpointer.all_steps() == [1] and not os.path.exists(directory / "2")
