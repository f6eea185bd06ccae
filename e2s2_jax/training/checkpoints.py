"""Train checkpoints with Orbax: state (step, params, optimizer state, RNG) and data position.

Layout: `MODEL_DIR/checkpoints/<step>/{state,data}`. `state` is the TrainState plus the base RNG
key (a PyTree, sharded save and restore); `data` is JSON with the number of global batches the
input pipeline has produced, which `restore` hands back so the trainer skips that many batches
of its deterministic (seeded) pipeline.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves no half checkpoint among the steps `latest_step` sees: restore
always takes the newest complete one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from e2s2_jax.interop import params_io
from e2s2_jax.training.train_state import TrainState

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def _state_tree(state: TrainState, rng: jax.Array) -> dict:
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        # Placed like `step` (replicated over the mesh): Orbax saves only global arrays.
        "rng": jax.device_put(jax.random.key_data(rng), state.step.sharding),
    }


class TrainCheckpointer:
    """Save / restore train checkpoints under `directory`; keeps the newest `keep` of them.

    Saves are asynchronous (Orbax copies the arrays to host, then writes in a background
    thread); `wait()` blocks until the last one is on disk. Every process of a multi-host run
    calls every method (Orbax coordinates the writes).
    """

    def __init__(self, directory: str | epath.Path, *, keep: int | None = 3, async_save=True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, state: TrainState, rng: jax.Array, data_position: Mapping[str, Any], *, force=False
    ) -> bool:
        """Starts saving `state` at its step; returns False when that step is already saved."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state, rng)),
                data=ocp.args.JsonSave(dict(data_position)),
            ),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(
        self,
        abstract_state: TrainState,
        shardings: TrainState,
        rng_template: jax.Array,
        step: int | None = None,
    ) -> tuple[TrainState, jax.Array, dict]:
        """`(state, rng, data_position)` of checkpoint `step` (the newest when None), each array
        placed with `shardings`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No complete checkpoint in {self.directory}.")
        rng_data = jax.random.key_data(rng_template)
        replicated = shardings.step
        target = {
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "params": _with_shardings(abstract_state.params, shardings.params),
            "opt_state": _with_shardings(abstract_state.opt_state, shardings.opt_state),
            "rng": jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=replicated),
        }
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, FileNotFoundError, OSError) as error:
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} cannot be restored into this model "
                f"and optimizer ({type(error).__name__}: {error}). If the model or optimizer "
                "changed, start from its params with `train.initial_checkpoint` instead of "
                "resuming; if the checkpoint is damaged, delete that step's directory to "
                "resume from the one before."
            ) from error
        tree = restored["state"]
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
        rng = jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(rng_template))
        return state, rng, dict(restored["data"] or {})

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


# ----------------------------------------------------------------------------- initialisation


def _flat(tree: PyTree) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _params_directory(path: epath.Path) -> tuple[epath.Path, str]:
    """The Orbax directory holding params, and how they sit in it: `params_io` writes
    `<dir>/params`; a train checkpoint step holds `<dir>/state` with a `params` subtree; a
    train run's MODEL_DIR holds `checkpoints/<step>`."""
    step = params_io.newest_checkpoint_step(str(path))
    if step is not None:
        path = path / "checkpoints" / str(step)
    if (path / "state").exists():
        return path / "state", "state"
    if (path / "params").exists():
        return path / "params", "params"
    raise CheckpointError(
        f"{path} holds no parameters: expected a train checkpoint (`<step>/state`), a run's "
        "MODEL_DIR (`checkpoints/<step>`), or an imported model (`params`, from "
        "`python -m e2s2_jax.interop.hf import`)."
    )


def _absolute(path: str | epath.Path) -> epath.Path:
    """`path` made absolute when it is local: Orbax finds no metadata under a relative path."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


_OLD_ATTENTION_LAYOUT_HINT = (
    " The attention kernels here are 3-D: checkpoints written before 2026-12-02 stored them "
    "[embed, heads, kv] / [heads, kv, embed]; this model stores them 2-D, [embed, heads * kv] / "
    "[heads * kv, embed] (so that Adafactor factors them). Reshape those arrays (the same "
    "values in row-major order) and save the params again, or export the old checkpoint to "
    "Hugging Face with the code of that date and import it here."
)


def _is_old_attention_layout(stored: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Whether `stored` is a pre-2026-12-02 3-D attention kernel of the 2-D `wanted` (a leading
    scanned-layer axis allowed)."""
    stored, wanted = tuple(stored), tuple(wanted)
    if len(stored) < 3 or len(stored) != len(wanted) + 1:
        return False
    return stored[:-2] + (stored[-2] * stored[-1],) == wanted or (
        stored[:-3] + (stored[-3] * stored[-2], stored[-1]) == wanted
    )


def load_params_into(
    path: str | epath.Path, init_params: PyTree, param_shardings: PyTree
) -> tuple[PyTree, list[str], list[str]]:
    """Params for a model initialised as `init_params`, read from the checkpoint at `path`.

    Parameters present in both with the same shape come from the checkpoint; parameters the
    checkpoint lacks (new heads, a fusion layer) keep their initial values; checkpoint entries
    this model does not have (heads dropped for fine-tuning) are ignored.

    Returns `(params, filled_from_init, ignored_from_checkpoint)` (slash-joined paths).
    """
    directory, kind = _params_directory(_absolute(path))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        metadata = checkpointer.metadata(directory).item_metadata
    except (FileNotFoundError, ValueError, OSError) as error:
        raise CheckpointError(f"Cannot read checkpoint metadata in {directory}: {error}") from error
    if metadata is None:
        raise CheckpointError(
            f"{directory} has no readable Orbax metadata (`_METADATA`): the checkpoint is "
            "incomplete or not an Orbax PyTree; point at a complete step or re-export the model."
        )
    stored = metadata["params"] if kind == "state" else metadata
    stored_flat = _flat(dict(stored))
    init_flat = _flat(init_params)
    shardings_flat = _flat(param_shardings)
    mismatched = [
        f"{name}: checkpoint {tuple(stored_flat[name].shape)}, model {tuple(value.shape)}"
        for name, value in init_flat.items()
        if name in stored_flat and tuple(stored_flat[name].shape) != tuple(value.shape)
    ]
    if mismatched:
        old_layout = any(
            _is_old_attention_layout(stored_flat[name].shape, value.shape)
            for name, value in init_flat.items()
            if name in stored_flat
        )
        raise CheckpointError(
            f"Parameters in {directory} do not fit the model's shapes: {mismatched[:5]}. Use a "
            "model Gin file with the checkpoint's sizes (its t5_config.json or operative config)."
            + (_OLD_ATTENTION_LAYOUT_HINT if old_layout else "")
        )
    wanted = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings_flat[name])
        for name, value in init_flat.items()
        if name in stored_flat
    }
    target = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in wanted.items()})
    if kind == "state":
        target = {"params": target}
    restored = checkpointer.restore(
        directory,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target
            ),
            partial_restore=True,
        ),
    )
    checkpointer.close()
    restored_flat = _flat(restored["params"] if kind == "state" else restored)
    params_flat = {name: restored_flat.get(name, value) for name, value in init_flat.items()}
    filled = sorted(set(init_flat) - set(stored_flat))
    ignored = sorted(set(stored_flat) - set(init_flat))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params_flat.items()})
    return params, filled, ignored
