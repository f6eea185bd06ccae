"""A model directory: Orbax-saved params plus `t5_config.json` (no pickle anywhere)."""

from __future__ import annotations

import dataclasses
import json
import os

import orbax.checkpoint as ocp
from flax import linen as nn

from e2s2_jax.models.t5 import T5Config

CONFIG_NAME = "t5_config.json"
PARAMS_NAME = "params"


def save_params(directory: str, config: T5Config, params: dict) -> None:
    """Writes `params` (Orbax, atomic) and `config` (JSON) under `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_NAME), nn.unbox(params), force=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def load_params(directory: str) -> tuple[T5Config, dict]:
    """Reads what `save_params` wrote; errors name the missing or unreadable file."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    params_path = os.path.join(directory, PARAMS_NAME)
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
        params = checkpointer.restore(params_path)
    return T5Config(**fields), params
