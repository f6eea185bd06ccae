"""The training job (`python -m e2s2_jax.main train`): the loop over the jitted train step,
with resume, evaluation, the non-finite guard, MODEL_DIR's run lock, preemption (SIGTERM) and
the run directory (config.gin, operative_config.gin, params.txt, t5_config.json, metrics).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence

import flax.linen as nn
import flax.traverse_util as traverse_util
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from e2s2_jax.console import console
from e2s2_jax.errors import EXIT_NON_FINITE, EXIT_PREEMPTED, ConfigError, TrainingStopped
from e2s2_jax.interop import params_io
from e2s2_jax.models import sigma_reparam
from e2s2_jax.training import flops, partitioning
from e2s2_jax.training.checkpoints import TrainCheckpointer, load_params_into
from e2s2_jax.training.eval_step import eval_metrics, make_eval_fns
from e2s2_jax.training.input_pipeline import (
    count_tokens,
    get_dataset,
    load_eval_batches,
    numpy_batches,
)
from e2s2_jax.training.metrics_writer import MetricsWriter, Throughput, peak_flops, progress_line
from e2s2_jax.training.run_lock import RunLock
from e2s2_jax.training.train_state import (
    TrainState,
    abstract_boxed_train_params,
    init_train_state,
)
from e2s2_jax.training.train_step import make_train_step


def write_config(model_dir: str, name: str, text: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, name), "w") as f:
            f.write(text)


def check_model_dir(model_dir: str) -> None:
    """Creates MODEL_DIR and checks it is writable (before anything expensive)."""
    if model_dir.startswith(("gs://", "s3://")):
        return
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(
            f"MODEL_DIR={model_dir!r} is not writable ({error.strerror}): choose a directory "
            'you can write, e.g. --gin.MODEL_DIR=\\"$HOME/runs/my_run\\".'
        ) from error


class _Preemption:
    """SIGTERM (TPU VM preemption, `kill`) sets a flag; the loop saves and exits at the next
    step. Multi-host runs use JAX's preemption sync point so every process stops at one step."""

    def __init__(self):
        self.requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return multihost_utils.reached_preemption_sync_point(step)


def _flops_per_step(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Some backends have no cost model.
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _model_flops_per_step(model, objective, batch) -> float:
    """`training.flops` model FLOPs of one step on `batch`'s shapes; an objective that runs
    several encoder views per example (E2S2) runs that many rows per example."""
    rows, inputs_length = batch["encoder_input_tokens"].shape
    views = len(getattr(objective, "views", ("encoder_input_tokens",)))
    targets_length = batch["decoder_target_tokens"].shape[1]
    output_layer = model.output_layer_factory(model.config)
    return flops.step_flops(
        model.config, rows * views, inputs_length, targets_length, output_layer
    ).train


def _param_table(boxed_params) -> str:
    lines = [f"{'parameter':<70} {'shape':<22} logical axes"]
    total = 0
    flat = traverse_util.flatten_dict(
        boxed_params, is_leaf=lambda k, v: isinstance(v, nn.Partitioned)
    )
    for path, leaf in sorted(flat.items()):
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
        total += int(np.prod(value.shape))
        lines.append(f"{'/'.join(path):<70} {str(tuple(value.shape)):<22} {tuple(names)}")
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines) + "\n"


@gin.configurable(module="e2s2_jax")
def train(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = 32,
    model=gin.REQUIRED,
    objective=gin.REQUIRED,
    optimizer=gin.REQUIRED,
    learning_rate_schedule=None,
    feature_converter=gin.REQUIRED,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    num_microbatches: int = 1,
    seed: int = 0,
    data_seed: int | None = 0,
    initial_checkpoint: str | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    log_every: int = 100,
    eval_every: int = 0,
    eval_batches: int = 8,
    eval_split: str = "validation",
    stop_after_steps: int | None = None,
    skip_nonfinite_steps: int = 0,
    attention_entropy_every: int = 0,
) -> dict[str, float]:
    """Trains `model` on the task, resuming from MODEL_DIR's newest checkpoint when there is
    one. Returns the last logged train metrics.

    Args (Gin bindings `train.NAME`):
      mesh_shape: `(data, fsdp, model)` sizes; one -1 fills the devices.
      initial_checkpoint: params to start from when MODEL_DIR has no checkpoint (an imported
        HF model's directory, another run's MODEL_DIR or checkpoint step); parameters it lacks
        keep their initialisers (listed), ones the model lacks are dropped (listed).
      checkpoint_every / keep_checkpoints: save period (steps) and how many to keep; the
        last step is always saved.
      log_every: steps between progress lines and TensorBoard points.
      eval_every: steps between evaluations of the objective on `eval_split` (0: never).
      stop_after_steps: leave the loop after this many steps of this invocation (for tests
        and time-boxed jobs); the final checkpoint is still written.
      skip_nonfinite_steps: how many steps in a row may have a non-finite loss or gradient
        norm (their updates are never applied) before training stops; 0 stops at the first.
        A stop raises `TrainingStopped` (exit status 3) and writes no checkpoint after the
        last good step.
      attention_entropy_every: every this many steps, the step also measures each attention
        layer's entropy (`models/attention_entropy.py`) and the step's metrics are written to
        TensorBoard and train_metrics.jsonl (`attention_entropy/...`); 0: never. Those steps
        run a second compiled program (compiled on first use); the others run the plain one,
        unchanged.
    """
    settings = dict(locals())  # the bindings, handed on to _train
    start_time = time.time()
    check_model_dir(model_dir)
    lock = _lock_model_dir(model_dir)
    try:
        return _train(**settings, start_time=start_time)
    finally:
        if lock is not None:
            lock.release()


def _lock_model_dir(model_dir: str):
    """Process 0 takes MODEL_DIR's run lock (`training.run_lock`); None elsewhere."""
    if jax.process_index() != 0:
        return None
    if model_dir.startswith(("gs://", "s3://")):
        console.info(f"MODEL_DIR {model_dir} is an object store: this run takes no lock on it.")
        return None
    lock = RunLock(model_dir)
    took_over = lock.acquire()
    if took_over:
        console.info(f"MODEL_DIR lock: {took_over}")
    return lock


class _NonFiniteGuard:
    """Reads each step's `nonfinite` flag (one step late, so the host never waits for the step
    it has just dispatched) and stops training after more than `allowed` such steps in a row."""

    def __init__(self, allowed: int, checkpointer):
        self.allowed = allowed
        self.checkpointer = checkpointer
        self.in_a_row = 0
        self.pending = None

    def push(self, step: int, metrics) -> None:
        """Checks the previous step, then holds this one's flag until the next call."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Checks the held step (before a save or an eval, and at the end)."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        if not float(metrics["nonfinite"]):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if self.in_a_row <= self.allowed:
            console.info(
                f"step {step}: non-finite loss {loss} / grad_norm {grad_norm}; update skipped "
                f"({self.in_a_row} in a row, train.skip_nonfinite_steps={self.allowed})"
            )
            return
        newest = self.checkpointer.latest_step()
        kept = (
            f"the newest checkpoint, {self.checkpointer.directory}/{newest}, is the last good state"
            if newest is not None
            else "no checkpoint had been written"
        )
        raise TrainingStopped(
            f"training stopped at step {step}: loss {loss}, grad_norm {grad_norm} "
            f"({self.in_a_row} non-finite step(s) in a row; that step's update was not applied "
            f"and nothing after it was saved); {kept}. Try a lower learning rate, gradient "
            "clipping (--gin.make_optimizer.gradient_clip_norm=1.0), or "
            "--gin.train.skip_nonfinite_steps=N to skip up to N bad steps in a row.",
            EXIT_NON_FINITE,
        )


def _train(
    *,
    model_dir,
    mixture_or_task_name,
    task_feature_lengths,
    train_steps,
    batch_size,
    model,
    objective,
    optimizer,
    learning_rate_schedule,
    feature_converter,
    mesh_shape,
    num_microbatches,
    seed,
    data_seed,
    initial_checkpoint,
    checkpoint_every,
    keep_checkpoints,
    async_checkpointing,
    log_every,
    eval_every,
    eval_batches,
    eval_split,
    stop_after_steps,
    skip_nonfinite_steps,
    attention_entropy_every,
    start_time,
) -> dict[str, float]:
    """`train`'s body, with MODEL_DIR locked."""
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.job_mesh("train", mesh_shape, batch_size, num_microbatches)
    write_config(model_dir, "config.gin", gin.config_str())
    console.info(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)"
    )

    rng = jax.random.key(seed)
    init_rng, train_rng = jax.random.split(rng)
    state, shardings = init_train_state(model, optimizer, mesh, init_rng, rules=rules)
    boxed, _ = abstract_boxed_train_params(model)
    write_config(model_dir, "params.txt", _param_table(boxed))
    # The model's sizes, so that `convert export --params_dir MODEL_DIR` reads the run.
    write_config(model_dir, params_io.CONFIG_NAME, params_io.config_json(model.config))

    checkpointer = TrainCheckpointer(
        os.path.join(model_dir, "checkpoints"),
        keep=keep_checkpoints,
        async_save=async_checkpointing,
    )
    data_position = {"batches": 0}
    if checkpointer.latest_step() is not None:
        abstract = jax.eval_shape(lambda: state)
        del state
        state, train_rng, data_position = checkpointer.restore(abstract, shardings, train_rng)
        console.info(
            f"resumed from {checkpointer.directory}/{int(state.step)} "
            f"(data position {data_position})"
        )
    elif initial_checkpoint:
        reparametrised = sigma_reparam.enabled(model)
        # Loaded as the plain model's params (a sigmaReparam checkpoint's W_hat); with
        # sigmaReparam on, then reparametrised with gamma = sigma(W): the function is unchanged.
        init_params, init_shardings = state.params, shardings.params
        if reparametrised:
            init_params = sigma_reparam.plain(init_params)
            init_shardings = sigma_reparam.plain(init_shardings)
        params, filled, ignored = load_params_into(initial_checkpoint, init_params, init_shardings)
        model_state = {}
        if reparametrised:
            params, model_state = jax.jit(
                sigma_reparam.reparametrise,
                out_shardings=(shardings.params, shardings.model_state),
            )(params)
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
        state = TrainState(
            step=state.step, params=params, opt_state=opt_state, model_state=model_state
        )
        console.info(f"initialised from {initial_checkpoint}")
        if filled:
            console.info(
                f"  {len(filled)} parameters not in the checkpoint keep their initial values: "
                f"{', '.join(filled)}"
            )
        if ignored:
            console.info(
                f"  {len(ignored)} checkpoint entries unused by this model: {', '.join(ignored)}"
            )

    step = int(state.step)
    if step >= train_steps:
        console.info(
            f"MODEL_DIR already holds step {step} >= TRAIN_STEPS={train_steps}: nothing to do."
        )
        checkpointer.close()
        return {}

    dataset = get_dataset(
        mixture_or_task_name,
        task_feature_lengths,
        "train",
        batch_size,
        feature_converter,
        shuffle=True,
        seed=data_seed,
        num_epochs=None,
        skip_batches=data_position["batches"],
    )
    batches = numpy_batches(dataset)

    def compile_train_step(attention_entropy: bool):
        return (
            make_train_step(
                model,
                optimizer,
                objective,
                mesh,
                num_microbatches,
                learning_rate_fn=learning_rate_schedule,
                state_shardings=shardings,
                rules=rules,
                attention_entropy=attention_entropy,
            )
            .lower(state, batch, train_rng)
            .compile()
        )

    local_batch = next(batches)
    batch = partitioning.make_global_batch(local_batch, mesh, rules)
    compiled = compile_train_step(attention_entropy=False)
    compiled_with_entropy = None
    model_flops = _model_flops_per_step(model, objective, batch)
    throughput = Throughput(train_steps, model_flops, peak_flops())
    console.info(
        f"compiled the train step in {time.time() - start_time:.0f}s since start; "
        f"model FLOPs/step {model_flops:.3g} (for MFU), XLA's count "
        f"{_flops_per_step(compiled) or 0:.3g}"
    )

    is_writer = jax.process_index() == 0
    train_writer = MetricsWriter(model_dir, "train", enabled=is_writer)
    eval_writer = MetricsWriter(model_dir, "eval", enabled=is_writer)
    eval_batches_cache = None
    eval_fns = None
    preemption = _Preemption()
    nonfinite = _NonFiniteGuard(skip_nonfinite_steps, checkpointer)
    last_metrics: dict[str, float] = {}
    steps_this_run = 0
    throughput.reset(step)

    def save(force=False):
        # Every save reads the step's non-finite flag first: a bad step is never saved.
        nonfinite.flush()
        checkpointer.save(state, train_rng, data_position, force=force)

    try:
        while True:
            entropy_step = attention_entropy_every and (step + 1) % attention_entropy_every == 0
            if entropy_step and compiled_with_entropy is None:
                compiled_with_entropy = compile_train_step(attention_entropy=True)
                throughput.reset(step)
            step_fn = compiled_with_entropy if entropy_step else compiled
            state, metrics = step_fn(state, batch, train_rng)
            data_position = {"batches": data_position["batches"] + 1}
            step += 1
            steps_this_run += 1
            # A background save that failed is reported here, one step later (CheckpointError).
            checkpointer.check_finished_save()
            nonfinite.push(step, metrics)
            throughput.add_tokens(count_tokens(local_batch))
            if steps_this_run == 1:
                write_config(model_dir, "operative_config.gin", gin.operative_config_str())
            done = step >= train_steps or (
                stop_after_steps is not None and steps_this_run >= stop_after_steps
            )
            log_step = step % log_every == 0 or done
            if log_step or entropy_step:  # an entropy step's metrics are always written
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if log_step:
                    scalars.update(throughput.measure(step))
                train_writer.write(step, scalars)
                if log_step:
                    console.info(progress_line(step, train_steps, scalars))
                    last_metrics = scalars
            if eval_every and (step % eval_every == 0 or step >= train_steps):
                nonfinite.flush()
                if eval_fns is None:
                    eval_param_shardings = shardings.params
                    if sigma_reparam.enabled(model):
                        eval_param_shardings = sigma_reparam.plain(shardings.params)
                        fold_fn = jax.jit(sigma_reparam.fold, out_shardings=eval_param_shardings)
                    eval_fns = make_eval_fns(model, objective, mesh, rules, eval_param_shardings)
                    eval_batches_cache = load_eval_batches(
                        mixture_or_task_name,
                        task_feature_lengths,
                        eval_split,
                        batch_size,
                        feature_converter,
                        eval_batches,
                        mesh,
                        rules,
                    )
                eval_params = state.params
                if sigma_reparam.enabled(model):  # the plain model of W_hat
                    eval_params = fold_fn(state.params, state.model_state)
                scalars = eval_metrics(eval_fns, eval_params, eval_batches_cache)
                eval_writer.write(step, scalars)
                console.info(
                    f"eval at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
                )
                throughput.reset(step)
            if preemption.reached(step):
                console.info(f"SIGTERM: saving step {step} before exit")
                save(force=True)
                checkpointer.wait()
                raise TrainingStopped(
                    f"preempted (SIGTERM) at step {step}: saved {checkpointer.directory}/{step}; "
                    "relaunch the same command to resume.",
                    EXIT_PREEMPTED,
                )
            if step % checkpoint_every == 0 or done:
                save()
            if done:
                break
            local_batch = next(batches)
            batch = partitioning.make_global_batch(local_batch, mesh, rules)
        nonfinite.flush()
    finally:
        # Also on a stop: the saves already started (all of good states) are completed.
        checkpointer.close()
        train_writer.close()
        eval_writer.close()
    console.info(
        f"done at step {step}; checkpoints {checkpointer.all_steps()} in {checkpointer.directory}"
    )
    return last_metrics
