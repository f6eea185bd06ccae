"""`load_params_into`: partial restore into a model's params, from relative and absolute paths."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from e2s2_jax.training.checkpoints import CheckpointError, load_params_into


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
