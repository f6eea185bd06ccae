"""A model directory: Orbax-saved params plus `t5_config.json` (no pickle anywhere)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn

from e2s2_jax.models import sigma_reparam
from e2s2_jax.models.config import T5Config
from e2s2_jax.training.checksums import DamagedCheckpointError, verify_checksums

CONFIG_NAME = "t5_config.json"
PARAMS_NAME = "params"


def save_params(directory: str, config: T5Config, params: dict) -> None:
    """Writes `params` (Orbax, atomic) and `config` (JSON) under `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_NAME), nn.unbox(params), force=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        f.write(config_json(config))


def config_json(config: T5Config) -> str:
    """`config` as the JSON text of `t5_config.json`."""
    return json.dumps(dataclasses.asdict(config), indent=2)


def newest_checkpoint_step(model_dir: str) -> int | None:
    """The newest complete step under a train run's `MODEL_DIR/checkpoints`, or None (Orbax
    writes into `<step>.orbax-checkpoint-tmp-*` and renames when done)."""
    checkpoints = os.path.join(str(model_dir), "checkpoints")
    if not os.path.isdir(checkpoints):
        return None
    steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
    return max(steps) if steps else None


def newest_train_checkpoint_params(directory: str) -> str | None:
    """`MODEL_DIR/checkpoints/<newest step>/state` of a train run, or None."""
    step = newest_checkpoint_step(directory)
    return None if step is None else os.path.join(directory, "checkpoints", str(step), "state")


def read_state_params(state_path: str) -> dict:
    """The params of a train checkpoint's `state` item, as host numpy arrays (any device layout
    was saved). A sigmaReparam run's are read with its power-iteration vectors and folded into
    the plain params of its W_hat (`models/sigma_reparam.fold`)."""
    # The handler reads the item directory; `checkpointer.metadata` would also look for the
    # step's `_CHECKPOINT_METADATA` in it, which sits one level up.
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_path))
    names = ["params"]
    if sigma_reparam.has_gammas(dict(metadata["params"])):
        names.append("model_state")
    stored = {name: dict(metadata[name]) for name in names}
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        state_path,
        args=ocp.args.PyTreeRestore(
            item=jax.tree.map(lambda _: 0, stored),
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored),
            partial_restore=True,
        ),
    )
    if "model_state" not in restored:
        return restored["params"]
    return jax.device_get(sigma_reparam.fold(restored["params"], restored["model_state"]))


def load_params(directory: str) -> tuple[T5Config, dict]:
    """Reads what `save_params` wrote, or a train run's MODEL_DIR (its `t5_config.json` and
    the params of its newest checkpoint); errors name the missing or unreadable file."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    params_path = os.path.join(directory, PARAMS_NAME)
    train_state = None
    if not os.path.exists(params_path):
        train_state = newest_train_checkpoint_params(directory)
        params_path = train_state or params_path
    for path in (config_path, params_path):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: missing; expected a directory written by "
                "save_params (or `python -m e2s2_jax.interop.hf import`)."
            )
    with open(config_path) as f:
        try:
            fields = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e}).") from e
    known = {field.name for field in dataclasses.fields(T5Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{config_path}: unknown T5Config fields {unknown}.")
    with ocp.StandardCheckpointer() as checkpointer:
        if train_state is None:
            params = checkpointer.restore(params_path)
        else:  # only the params subtree, as host numpy arrays (any device layout was saved)
            try:  # the step's checksums, when it has them
                verify_checksums(os.path.dirname(params_path))
            except DamagedCheckpointError as e:
                raise ValueError(f"{e}; export another step, or restore it from a backup.") from e
            # The handler reads the item directory; `checkpointer.metadata` would also look for
            # the step's `_CHECKPOINT_METADATA` in it, which sits one level up.
            params = read_state_params(params_path)
    return T5Config(**fields), params
