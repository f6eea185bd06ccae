"""Train checkpoints with Orbax: state (step, params, optimizer state, RNG) and data position.

Layout: `MODEL_DIR/checkpoints/<step>/{state,data,checksums.json}`. `state` is the TrainState
plus the base RNG key (a PyTree, sharded save and restore); `data` is JSON with the number of
global batches the input pipeline has produced, which `restore` hands back so the trainer skips
that many batches of its deterministic (seeded) pipeline.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves no half checkpoint among the steps `latest_step` sees. Once a
save is complete, process 0 writes `checksums.json` beside it (`training/checksums.py`): the
size and SHA-256 of every file of the step (written to a temporary name, then renamed).
`restore` verifies them: a damaged newest checkpoint is set aside (`<step>.damaged`) and the
one before it restored. A step without `checksums.json` (written before checksums existed, or
the process was killed between the save and its checksums) restores unverified, with a warning.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from e2s2_jax.errors import CheckpointError
from e2s2_jax.interop import params_io
from e2s2_jax.models import sigma_reparam
from e2s2_jax.training import partitioning
from e2s2_jax.training.checksums import (
    CHECKSUMS_NAME,
    DamagedCheckpointError,
    verify_checksums,
    write_checksums,
)
from e2s2_jax.training.train_state import TrainState, abstract_boxed_params

PyTree = Any
log = logging.getLogger(__name__)


class NonFiniteStateError(CheckpointError):
    """A train state holding NaN or Inf, which `TrainCheckpointer.save` refuses to write."""


# ----------------------------------------------------------------------------- train checkpoints


def _state_tree(state: TrainState, rng: jax.Array) -> dict:
    tree = {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        # Placed like `step` (replicated over the mesh): Orbax saves only global arrays.
        "rng": jax.device_put(jax.random.key_data(rng), state.step.sharding),
    }
    if state.model_state:  # only when there is one: a plain model's checkpoints are as before
        tree["model_state"] = state.model_state
    return tree


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _finite_flags(tree: PyTree) -> jax.Array:
    """[leaves] bool: whether each floating-point leaf of `tree` is all finite."""
    leaves = [x for x in jax.tree.leaves(tree) if _is_float(x)]
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


class TrainCheckpointer:
    """Save / restore train checkpoints under `directory`; keeps the newest `keep` of them.

    Saves are asynchronous (Orbax copies the arrays to host, then writes in a background
    thread). Call `check_finished_save()` every step: it raises CheckpointError as soon as a
    background save has failed, and writes the checksums of one that has finished. `wait()`
    blocks until the last save and its checksums are on disk. Every process of a multi-host
    run calls every method (Orbax coordinates the writes; process 0 writes the checksums).
    """

    def __init__(self, directory: str | epath.Path, *, keep: int | None = 3, async_save=True):
        self.directory = _absolute(directory)  # Orbax writes no relative path
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )
        self._is_primary = jax.process_index() == 0
        self._saving: int | None = None  # a step whose save started and was not checked yet
        self._checksums_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="checkpoint_checksums"
        )
        self._checksums: tuple[int, concurrent.futures.Future] | None = None
        self._finite_fns: dict[Any, Any] = {}

    def step_directory(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, state: TrainState, rng: jax.Array, data_position: Mapping[str, Any], *, force=False
    ) -> bool:
        """Starts saving `state` at its step; returns False when that step is already saved.

        Raises NonFiniteStateError (and saves nothing) when the params or optimizer state hold
        NaN or Inf, and CheckpointError when the previous save or this one fails.
        """
        step = int(state.step)
        self._check_finite(state)
        self.wait()
        if step in self.manager.all_steps():
            return False
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_state_tree(state, rng)),
                    data=ocp.args.JsonSave(dict(data_position)),
                ),
                force=force,
            )
        except Exception as error:
            raise self._save_failed(step, error) from error
        if saved:
            self._saving = step
            if not self.async_save:
                self.wait()
        return saved

    def check_finished_save(self) -> int | None:
        """Returns the step whose save finished since the last call (None when none did).

        Cheap while a save runs (no I/O, no collective): call it every step. Raises
        CheckpointError naming the step, its directory and the cause when the background save
        failed (the checkpoints before it are kept), or when writing the checksums of a finished
        one failed. When a save has finished, process 0 starts writing its checksums in a
        background thread.
        """
        self._collect_checksums(block=False)
        if self._saving is None or self.manager.is_saving_in_progress():
            return None
        return self._finish_save()

    def wait(self) -> None:
        """Blocks until the last save and its checksums are on disk; raises CheckpointError as
        `check_finished_save` does."""
        self._collect_checksums(block=True)
        if self._saving is not None:
            self._finish_save()
        self._collect_checksums(block=True)

    def _finish_save(self) -> int:
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(step, error) from error
        if self._is_primary:
            self._collect_checksums(block=True)
            job = self._checksums_pool.submit(write_checksums, self.step_directory(step))
            self._checksums = (step, job)
        return step

    def _collect_checksums(self, *, block: bool) -> None:
        if self._checksums is None or not (block or self._checksums[1].done()):
            return
        (step, job), self._checksums = self._checksums, None
        try:
            job.result()
        except Exception as error:
            raise CheckpointError(
                f"Checkpoint {self.step_directory(step)} was saved, but writing its "
                f"{CHECKSUMS_NAME} failed ({type(error).__name__}: {error}): it will restore "
                "unverified. Fix the cause (a full disk?) before training on."
            ) from error

    def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
        self._wait_for_failed_writes()
        self.manager.reload()  # Orbax forgets the steps it meant to prune; they are on disk
        kept = self.all_steps()
        return CheckpointError(
            f"Saving checkpoint step {step} to {self.step_directory(step)} failed: "
            f"{type(error).__name__}: {error}. "
            + (
                f"The complete checkpoints before it are kept (steps {kept}); fix the cause (a "
                "full disk?) and rerun to resume from the newest of them."
                if kept
                else "No earlier checkpoint exists; fix the cause (a full disk?) and rerun."
            )
        )

    def _wait_for_failed_writes(self) -> None:
        """Waits for the writes of a failed save that are still running: Orbax stops waiting
        at the first failed one, and the others, cut off when the process exits, would each log
        a traceback. Orbax 0.12.8 keeps them in private attributes: a no-op where it does not."""
        async_manager = getattr(self.manager._checkpointer, "_async_manager", None)
        for write in getattr(async_manager, "_commit_futures", None) or ():
            try:
                write.result(timeout=600)
            except Exception:  # reported already, by the first failure
                pass

    def _check_finite(self, state: TrainState) -> None:
        tree = {"params": state.params, "opt_state": state.opt_state}
        sharding = state.step.sharding
        if sharding not in self._finite_fns:
            self._finite_fns[sharding] = jax.jit(_finite_flags, out_shardings=sharding)
        flags = np.asarray(self._finite_fns[sharding](tree))
        if flags.all():
            return
        names = [
            jax.tree_util.keystr(path)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if _is_float(x)
        ]
        bad = [name for name, finite in zip(names, flags, strict=True) if not finite]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteStateError(
            f"Refusing to save step {int(state.step)} to {self.directory}: the train state holds "
            f"NaN or Inf in {', '.join(bad[:5])}{more}. The checkpoints before it are kept "
            f"(steps {self.all_steps()}); resume from one of them with a smaller learning rate, "
            "longer warm-up or gradient clipping."
        )

    def restore(
        self,
        abstract_state: TrainState,
        shardings: TrainState,
        rng_template: jax.Array,
        step: int | None = None,
    ) -> tuple[TrainState, jax.Array, dict]:
        """`(state, rng, data_position)` of checkpoint `step`, each array placed with
        `shardings`. When `step` is None: of the newest checkpoint whose checksums match; newer
        damaged ones are moved to `<step>.damaged`, each with one warning naming it."""
        steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise CheckpointError(f"No complete checkpoint in {self.directory}.")
        damaged: list[tuple[int, DamagedCheckpointError]] = []
        for candidate in steps:
            try:
                verified = verify_checksums(self.step_directory(candidate))
            except DamagedCheckpointError as error:
                damaged.append((candidate, error))
                continue
            if not verified and self._is_primary:
                log.warning(
                    f"Checkpoint {self.step_directory(candidate)} has no {CHECKSUMS_NAME} "
                    "(written before checksums existed, or the run stopped before writing "
                    "them): restoring it unverified."
                )
            restored = self._restore_step(
                candidate, abstract_state, shardings, rng_template, verified
            )
            self._set_aside(damaged, candidate)
            return restored
        if step is not None:
            raise CheckpointError(
                f"{damaged[0][1]}. Restore that step directory from a backup, or resume from an "
                "earlier step."
            )
        raise CheckpointError(
            f"No usable checkpoint in {self.directory}: "
            + "; ".join(str(error) for _, error in damaged)
            + ". Restore those step directories from a backup, or move them away (e.g. to "
            "`<step>.damaged`) to start again from scratch or from `train.initial_checkpoint`."
        )

    def _restore_step(
        self,
        step: int,
        abstract_state: TrainState,
        shardings: TrainState,
        rng_template: jax.Array,
        verified: bool,
    ) -> tuple[TrainState, jax.Array, dict]:
        rng_data = jax.random.key_data(rng_template)
        replicated = shardings.step
        target = {
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "params": _with_shardings(abstract_state.params, shardings.params),
            "opt_state": _with_shardings(abstract_state.opt_state, shardings.opt_state),
            "rng": jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=replicated),
        }
        if abstract_state.model_state:
            target["model_state"] = _with_shardings(
                abstract_state.model_state, shardings.model_state
            )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:  # TensorStore raises bare Exceptions for unreadable files
            raise CheckpointError(
                f"Checkpoint {self.step_directory(step)} cannot be restored into this model "
                f"and optimizer ({type(error).__name__}: {error}). If the model or optimizer "
                "changed, start from its params with `train.initial_checkpoint` instead of "
                "resuming"
                + (
                    f" (its files match their {CHECKSUMS_NAME}: it is not damaged)."
                    if verified
                    else "; if the checkpoint is damaged, move that step's directory away (e.g. "
                    "to `<step>.damaged`) to resume from the one before."
                )
            ) from error
        tree = restored["state"]
        state = TrainState(
            step=tree["step"],
            params=tree["params"],
            opt_state=tree["opt_state"],
            model_state=tree.get("model_state", {}),
        )
        rng = jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(rng_template))
        return state, rng, dict(restored["data"] or {})

    def _set_aside(self, damaged: list[tuple[int, DamagedCheckpointError]], restored: int):
        """Moves the damaged steps newer than `restored` to `<step>.damaged` (Orbax lists only
        numeric names), so that the run saves those steps again."""
        if not damaged:
            return
        for step, error in damaged:
            target = self.directory / f"{step}.damaged"
            suffix = 1
            while target.exists():
                suffix += 1
                target = self.directory / f"{step}.damaged-{suffix}"
            if self._is_primary:
                self.step_directory(step).rename(target)
                log.warning(
                    f"{error}: moved it to {target} and restored "
                    f"{self.step_directory(restored)} instead."
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("e2s2_jax:damaged_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the last save (raising CheckpointError as `wait` does), then closes."""
        try:
            self.wait()
        finally:
            self.manager.close()
            self._checksums_pool.shutdown(wait=True)


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


def _check_shapes(directory, stored_flat: Mapping, init_flat: Mapping) -> None:
    """Raises CheckpointError naming the parameters whose stored shape is not the model's."""
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
    if kind == "state":  # a train checkpoint step: verify its checksums when it has them
        try:
            verify_checksums(directory.parent)
        except DamagedCheckpointError as error:
            raise CheckpointError(
                f"{error}. Load another step (eval / infer: `checkpoint_step`; "
                "`train.initial_checkpoint`: `MODEL_DIR/checkpoints/<step>`), or restore this "
                "one from a backup."
            ) from error
    # The handler reads an item directory (`<step>/state`, `params`); `Checkpointer.metadata`
    # would also look for the step's `_CHECKPOINT_METADATA` in it, which sits one level up.
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(directory)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise CheckpointError(f"Cannot read checkpoint metadata in {directory}: {error}") from error
    if metadata is None:
        raise CheckpointError(
            f"{directory} has no readable Orbax metadata (`_METADATA`): the checkpoint is "
            "incomplete or not an Orbax PyTree; point at a complete step or re-export the model."
        )
    stored = metadata["params"] if kind == "state" else metadata
    if kind == "state" and sigma_reparam.has_gammas(dict(stored)):
        return _load_folded_params(directory, init_params, param_shardings)
    stored_flat = _flat(dict(stored))
    init_flat = _flat(init_params)
    shardings_flat = _flat(param_shardings)
    _check_shapes(directory, stored_flat, init_flat)
    wanted = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings_flat[name])
        for name, value in init_flat.items()
        if name in stored_flat
    }
    target = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in wanted.items()})
    if kind == "state":
        target = {"params": target}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
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
    except Exception as error:  # TensorStore raises bare Exceptions for unreadable files
        raise _unreadable(directory, error) from error
    finally:
        checkpointer.close()
    restored_flat = _flat(restored["params"] if kind == "state" else restored)
    params_flat = {name: restored_flat.get(name, value) for name, value in init_flat.items()}
    filled = sorted(set(init_flat) - set(stored_flat))
    ignored = sorted(set(stored_flat) - set(init_flat))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params_flat.items()})
    return params, filled, ignored


def _load_folded_params(
    directory: epath.Path, init_params: PyTree, param_shardings: PyTree
) -> tuple[PyTree, list[str], list[str]]:
    """`load_params_into` for a train checkpoint of a sigmaReparam run: its params and
    power-iteration vectors read whole, then folded into the plain params of its `W_hat`
    (`params_io.read_state_params`) before they are matched to the model's."""
    try:
        folded = _flat(params_io.read_state_params(str(directory)))
    except Exception as error:  # TensorStore raises bare Exceptions for unreadable files
        raise _unreadable(directory, error) from error
    init_flat = _flat(init_params)
    shardings_flat = _flat(param_shardings)
    _check_shapes(directory, folded, init_flat)
    params_flat = {
        name: jax.device_put(folded[name], shardings_flat[name]) if name in folded else value
        for name, value in init_flat.items()
    }
    filled = sorted(set(init_flat) - set(folded))
    ignored = sorted(set(folded) - set(init_flat))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params_flat.items()})
    return params, filled, ignored


def _unreadable(directory, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Cannot read the parameters in {directory} ({type(error).__name__}: {error}): the "
        "checkpoint is damaged or incomplete; load another step or re-export the model."
    )


def restore_params(
    model_dir: str,
    model,
    mesh: jax.sharding.Mesh,
    rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
    checkpoint_step: int | None = None,
) -> PyTree:
    """The params of MODEL_DIR's checkpoint `checkpoint_step` (the newest when None), or of a
    params directory (`interop.hf import`) given as `model_dir`, sharded over `mesh` by `rules`.

    What eval, infer, the SSR job and the benchmarks load. Raises CheckpointError when the
    checkpoint lacks parameters `model` needs (other model Gin files than the run's).
    """
    boxed = abstract_boxed_params(model)
    shardings = partitioning.param_shardings(boxed, mesh, rules)
    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.unbox(boxed))
    path = model_dir
    if checkpoint_step is not None:
        path = os.path.join(model_dir, "checkpoints", str(checkpoint_step))
    params, filled, _ = load_params_into(path, init, shardings)
    if filled:
        raise CheckpointError(
            f"{path} lacks parameters this model needs: {filled[:8]}. Evaluate with the model "
            "Gin files the checkpoint was trained with (MODEL_DIR/config.gin lists them)."
        )
    return params
