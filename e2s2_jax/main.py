"""The Gin-configured entry point, with t5x's conventions.

    python -m e2s2_jax.main train --gin_file=gin/models/t5_1_1_tiny.gin \\
        --gin_file=gin/runs/pretrain.gin --gin.MODEL_DIR=\\"/tmp/run\\" \\
        --gin.MIXTURE_OR_TASK_NAME=\\"bundled_span_corruption\\" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 128, 'targets': 32}" --gin.TRAIN_STEPS=1000
    python -m e2s2_jax.main eval  ... (same Gin files; `gin/runs/eval.gin`)
    python -m e2s2_jax.main infer ... (`gin/runs/infer.gin`; a task split or a text file)
    python -m e2s2_jax.main ssr-generate ... (`gin/runs/ssr_generate.gin`; SSR's generation job)
    python -m e2s2_jax.main convert {import,export} ...   (Hugging Face <-> params; see --help)

Flags: `--gin_file` (repeatable; looked up in `--gin_search_paths`, default `gin/` and the
working directory), `--gin.NAME=VALUE` (a binding or macro, e.g. `--gin.train.batch_size=64`),
`--gin_bindings=...` (repeatable). Multi-host: `--coordinator_address`, `--num_processes`,
`--process_id` (or nothing on TPU VMs, where `jax.distributed.initialize()` finds the pod).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402

if __name__ == "__main__":
    # `python -m e2s2_jax.main` runs this file as `__main__`; code importing `e2s2_jax.main`
    # (the SSR job) must get this module, not a second copy that would register the Gin
    # configurables again and define another ConfigError class.
    sys.modules.setdefault("e2s2_jax.main", sys.modules[__name__])
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from e2s2_jax import gin_checks  # noqa: E402
from e2s2_jax.errors import (  # noqa: E402  (ConfigError re-exported: entry.ConfigError)
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    ConfigError,
    TrainingStopped,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.path.join(REPO_ROOT, "gin"), REPO_ROOT)
REQUIRED_MACROS = {
    "train": ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS"),
    "eval": ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS"),
    "infer": ("MODEL_DIR", "TASK_FEATURE_LENGTHS"),
    "ssr-generate": (),  # its Gin file marks its own macros %gin.REQUIRED
}


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ----------------------------------------------------------------------------- Gin set-up


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `--gin.X=V` flags (t5x's shorthand) from the rest; returns (args, bindings)."""
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin.") :].split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    parser = argparse.ArgumentParser(
        prog="python -m e2s2_jax.main",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=("train", "eval", "infer", "ssr-generate"))
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument(
        "--gin_search_paths",
        default="",
        help="comma-separated directories searched for --gin_file and includes",
    )
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="call jax.distributed.initialize() with no arguments (TPU VM pods)",
    )
    args = parser.parse_args(rest)
    return args, [*args.gin_bindings, *bindings]


def _resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
    for directory in ("", *search_paths):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(
        f"--gin_file={name}: not found in the working directory or the search paths "
        f"{list(search_paths)}; give a path that exists or add its directory with "
        "--gin_search_paths."
    )


def parse_gin(mode: str, gin_files: Sequence[str], bindings: Sequence[str], search_paths: str):
    """Parses the Gin files and bindings, then checks `mode`'s required macros are bound."""
    import e2s2_jax.configurables  # noqa: F401  (registers the configurables)

    paths = [p for p in search_paths.split(",") if p] + list(DEFAULT_SEARCH_PATHS)
    for path in paths:
        gin.add_config_file_search_path(path)
    files = [_resolve_gin_file(name, paths) for name in gin_files]
    if not files:
        raise ConfigError(
            "No --gin_file given: pass a model file and a run file, e.g. "
            "--gin_file=gin/models/t5_1_1_tiny.gin --gin_file=gin/runs/pretrain.gin."
        )
    # Gin logs an error for every search path an include is not in; only a miss everywhere is.
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.getMessage().startswith("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except ModuleNotFoundError as error:
        # A Gin `import` line (how a team's own task module is loaded) naming a module that
        # is not on the path; gin appends the file and line to the message.
        raise ConfigError(
            f"A Gin file imports a module Python cannot find: {error}\nPut the directory that "
            "holds it on PYTHONPATH (or install its package), or fix the `import` line."
        ) from error
    except (OSError, ValueError, KeyError, SyntaxError) as error:
        imported = _IMPORT_LOCATION.search(str(error))
        if imported:
            # A module a Gin `import` line loads (a team's task registrations) raised: its own
            # message names the cause; Gin's spelling hint would not apply.
            file, line, module = imported.groups()
            raise ConfigError(
                f"{str(error).splitlines()[0]} (raised by `import {module}` in {file}, line {line})"
            ) from error
        raise ConfigError(
            f"Gin configuration error in {files} / bindings {list(bindings)}:\n{error}\n"
            "Check the spelling of the configurable and parameter names (the names are listed "
            "in e2s2_jax/configurables.py and the functions' signatures)."
        ) from error
    finally:
        logging.getLogger().removeFilter(quiet)
    missing = [name for name in REQUIRED_MACROS[mode] if _macro_unbound(name)]
    # Any other macro a Gin file marks `%gin.REQUIRED` (e.g. finetune.gin's INITIAL_CHECKPOINT).
    missing += sorted(
        scope
        for (scope, selector), values in gin.config._CONFIG.items()  # noqa: SLF001
        if selector.endswith("macro")
        and scope not in missing
        and repr(values.get("value")) == "%gin.REQUIRED"
    )
    if missing:
        examples = {
            "MODEL_DIR": '--gin.MODEL_DIR=\\"/path/to/run\\"',
            "MIXTURE_OR_TASK_NAME": '--gin.MIXTURE_OR_TASK_NAME=\\"bundled_span_corruption\\"',
            "TASK_FEATURE_LENGTHS": "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 128, 'targets': 32}\"",
            "TRAIN_STEPS": "--gin.TRAIN_STEPS=1000",
        }
        raise ConfigError(
            f"Missing required Gin macro(s) {missing} for `{mode}`: bind them in a Gin file or "
            "on the command line, e.g. "
            + " ".join(examples.get(name, f"--gin.{name}=...") for name in missing)
        )


# Gin's note on an error raised where a Gin file imports a module: `In file "F", line N` and
# the `import` statement.
_IMPORT_LOCATION = re.compile(r'In file "([^"]+)", line (\d+)\n\s+import ([\w.]+)')


def _macro_unbound(name: str) -> bool:
    try:
        value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return True
    return repr(value) == "%gin.REQUIRED" or value is gin.REQUIRED


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


# ----------------------------------------------------------------------------- data


def get_dataset(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
    feature_converter,
    *,
    shuffle: bool,
    seed: int | None,
    num_epochs: int | None,
    skip_batches: int = 0,
    shard: tuple[int, int] | None = None,
):
    """One shard's share of the global batches: `[batch_size / num_shards, ...]` numpy dicts.

    `shard` is `(index, num_shards)`, this process's by default: each process reads its own
    SeqIO shard. The first `skip_batches` are dropped (the restored data position; the seeded
    pipeline replays identically).
    """
    import seqio

    import tasks  # noqa: F401  (registers the bundled and C4 tasks)

    index, process_count = shard or (jax.process_index(), jax.process_count())
    if batch_size % process_count:
        raise ConfigError(
            f"Batch size {batch_size} is not divisible by the {process_count} processes: use "
            f"a multiple of {process_count}."
        )
    try:
        seqio.get_mixture_or_task(mixture_or_task_name)
    except ValueError as error:
        raise ConfigError(
            f"MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} is not registered ({error}). Register "
            "it in your own module (see tasks/registration.py) and import that module, e.g. with "
            "a Gin `import my_tasks` line."
        ) from error
    dataset = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=dict(task_feature_lengths),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
        shard_info=seqio.ShardInfo(index=index, num_shards=process_count),
        feature_converter=feature_converter,
        use_cached=False,
    )
    dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
    if skip_batches:
        dataset = dataset.skip(skip_batches)
    return dataset.prefetch(2)


def load_eval_batches(
    mixture_or_task_name,
    task_feature_lengths,
    split,
    batch_size,
    feature_converter,
    num_batches,
    mesh,
    rules,
) -> list[dict]:
    """The first `num_batches` global batches of `split`, in order, as sharded arrays."""
    from e2s2_jax.training import partitioning

    dataset = get_dataset(
        mixture_or_task_name,
        task_feature_lengths,
        split,
        batch_size,
        feature_converter,
        shuffle=False,
        seed=0,
        num_epochs=1,
    )
    return [
        partitioning.make_global_batch(b, mesh, rules)
        for b in numpy_batches(dataset.take(num_batches))
    ]


def numpy_batches(dataset) -> Iterator[dict]:
    """`dataset`'s elements as numpy; an error raised inside tf.data by the input (a damaged
    corpus file) becomes a ConfigError with that error's own message, not TensorFlow's dump."""
    import tensorflow as tf

    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            # The Python error raised in the pipeline is the last `SomeError: message` line.
            raised = re.findall(r"^(\w+Error): (.+)$", error.message, flags=re.MULTILINE)
            cause = raised[-1][1] if raised else error.message.splitlines()[0]
            raise ConfigError(f"reading the input data: {cause}") from error
        yield element


def count_tokens(local_batch: Mapping[str, np.ndarray]) -> float:
    """Non-pad encoder and decoder tokens of the global batch (from this process's rows)."""
    tokens = sum(
        float(np.count_nonzero(local_batch[name]))
        for name in ("encoder_input_tokens", "decoder_target_tokens")
        if name in local_batch
    )
    return tokens * jax.process_count()


# ----------------------------------------------------------------------------- train


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
        from jax.experimental import multihost_utils

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
    from e2s2_jax.training import flops

    rows, inputs_length = batch["encoder_input_tokens"].shape
    views = len(getattr(objective, "views", ("encoder_input_tokens",)))
    targets_length = batch["decoder_target_tokens"].shape[1]
    output_layer = model.output_layer_factory(model.config)
    return flops.step_flops(
        model.config, rows * views, inputs_length, targets_length, output_layer
    ).train


def _param_table(boxed_params) -> str:
    import flax.linen as nn
    import flax.traverse_util as traverse_util

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


def _eval_metrics(eval_fn, params, batches: list) -> dict[str, float]:
    """Objective metrics over `batches` as one large batch: each batch's terms are divided by
    the normalizers of all of them, then summed (exact, like microbatching)."""
    if not batches:
        return {}
    normalizer_fn, loss_fn = eval_fn
    per_batch = [normalizer_fn(batch) for batch in batches]
    totals = jax.tree.map(lambda *xs: sum(xs), *per_batch)
    sums: dict[str, float] = {}
    for batch in batches:
        metrics = jax.device_get(loss_fn(params, batch, totals))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    sums.update({name: float(value) for name, value in jax.device_get(totals).items()})
    return sums


def make_eval_fns(model, objective, mesh, rules, param_shardings):
    """Jitted `(normalizers(batch), metrics(params, batch, normalizers))`, no dropout."""
    import flax.linen as nn

    from e2s2_jax.training import partitioning

    batch_sharding = partitioning.batch_sharding(mesh, rules)

    @jax.jit
    def normalizers(batch):
        return objective.normalizers(batch)

    def metrics(params, batch, totals):
        with nn.logical_axis_rules(rules):
            _, values = objective(model, params, batch, totals, None)
        return values

    metrics = jax.jit(metrics, in_shardings=(param_shardings, batch_sharding, None))
    return normalizers, metrics


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
    from e2s2_jax.training.run_lock import RunLock

    if jax.process_index() != 0:
        return None
    if model_dir.startswith(("gs://", "s3://")):
        log(f"MODEL_DIR {model_dir} is an object store: this run takes no lock on it.")
        return None
    lock = RunLock(model_dir)
    took_over = lock.acquire()
    if took_over:
        log(f"MODEL_DIR lock: {took_over}")
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
            log(
                f"step {step}: non-finite loss {loss} / grad_norm {grad_norm}; update skipped "
                f"({self.in_a_row} in a row, train.skip_nonfinite_steps={self.allowed})"
            )
            return
        from e2s2_jax.errors import EXIT_NON_FINITE, TrainingStopped

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
    start_time,
) -> dict[str, float]:
    """`train`'s body, with MODEL_DIR locked."""
    from e2s2_jax.interop import params_io
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.checkpoints import TrainCheckpointer, load_params_into
    from e2s2_jax.training.metrics_writer import (
        MetricsWriter,
        Throughput,
        peak_flops,
        progress_line,
    )
    from e2s2_jax.training.train_state import TrainState, abstract_boxed_params, init_train_state
    from e2s2_jax.training.train_step import make_train_step

    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.create_mesh(*mesh_shape)
    data_shards = partitioning.data_parallel_size(mesh, rules)
    if batch_size % (data_shards * num_microbatches):
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by {data_shards * num_microbatches} "
            f"= data-parallel size {data_shards} (mesh {dict(mesh.shape)}) x num_microbatches "
            f"{num_microbatches}: set --gin.train.batch_size to a multiple of "
            f"{data_shards * num_microbatches}, or change train.mesh_shape / "
            "train.num_microbatches."
        )
    write_config(model_dir, "config.gin", gin.config_str())
    log(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)"
    )

    rng = jax.random.key(seed)
    init_rng, train_rng = jax.random.split(rng)
    state, shardings = init_train_state(model, optimizer, mesh, init_rng, rules=rules)
    boxed = abstract_boxed_params(model)
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
        log(
            f"resumed from {checkpointer.directory}/{int(state.step)} "
            f"(data position {data_position})"
        )
    elif initial_checkpoint:
        params, filled, ignored = load_params_into(
            initial_checkpoint, state.params, shardings.params
        )
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
        state = TrainState(step=state.step, params=params, opt_state=opt_state)
        log(f"initialised from {initial_checkpoint}")
        if filled:
            log(
                f"  {len(filled)} parameters not in the checkpoint keep their initial values: "
                f"{', '.join(filled)}"
            )
        if ignored:
            log(f"  {len(ignored)} checkpoint entries unused by this model: {', '.join(ignored)}")

    step = int(state.step)
    if step >= train_steps:
        log(f"MODEL_DIR already holds step {step} >= TRAIN_STEPS={train_steps}: nothing to do.")
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
    train_step = make_train_step(
        model,
        optimizer,
        objective,
        mesh,
        num_microbatches,
        learning_rate_fn=learning_rate_schedule,
        state_shardings=shardings,
        rules=rules,
    )
    local_batch = next(batches)
    batch = partitioning.make_global_batch(local_batch, mesh, rules)
    compiled = train_step.lower(state, batch, train_rng).compile()
    model_flops = _model_flops_per_step(model, objective, batch)
    throughput = Throughput(train_steps, model_flops, peak_flops())
    log(
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
            state, metrics = compiled(state, batch, train_rng)
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
            if step % log_every == 0 or done:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                scalars.update(throughput.measure(step))
                train_writer.write(step, scalars)
                log(progress_line(step, train_steps, scalars))
                last_metrics = scalars
            if eval_every and (step % eval_every == 0 or step >= train_steps):
                nonfinite.flush()
                if eval_fns is None:
                    eval_fns = make_eval_fns(model, objective, mesh, rules, shardings.params)
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
                scalars = _eval_metrics(eval_fns, state.params, eval_batches_cache)
                eval_writer.write(step, scalars)
                log(f"eval at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
                throughput.reset(step)
            if preemption.reached(step):
                log(f"SIGTERM: saving step {step} before exit")
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
    log(f"done at step {step}; checkpoints {checkpointer.all_steps()} in {checkpointer.directory}")
    return last_metrics


# ----------------------------------------------------------------------------- eval / infer


def _restore_params(model_dir: str, model, mesh, rules, checkpoint_step: int | None):
    """The params of MODEL_DIR's checkpoint `checkpoint_step` (newest when None), or of a
    params directory (`interop.hf import`) given as MODEL_DIR."""
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.checkpoints import CheckpointError, load_params_into
    from e2s2_jax.training.train_state import abstract_boxed_params

    boxed = abstract_boxed_params(model)
    shardings = partitioning.param_shardings(boxed, mesh, rules)
    import flax.linen as nn

    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.unbox(boxed))
    path = model_dir
    if checkpoint_step is not None:
        path = os.path.join(model_dir, "checkpoints", str(checkpoint_step))
    params, filled, ignored = load_params_into(path, init, shardings)
    if filled:
        raise CheckpointError(
            f"{path} lacks parameters this model needs: {filled[:8]}. Evaluate with the model "
            "Gin files the checkpoint was trained with (MODEL_DIR/config.gin lists them)."
        )
    return params


def _decode_texts(model, params, decode_config, vocabulary, token_batches, seed=0):
    from e2s2_jax.decoding import make_predict_fn

    predict = make_predict_fn(model, decode_config)
    rng = jax.random.key(seed)
    for i, tokens in enumerate(token_batches):
        result = jax.device_get(predict(params, jnp.asarray(tokens), jax.random.fold_in(rng, i)))
        tokens_out = np.asarray(result.tokens)
        scores = np.asarray(result.scores)
        if tokens_out.ndim == 3:  # beams: [batch, beams, length], best first
            tokens_out, scores = tokens_out[:, 0], scores[:, 0]
        for row, score in zip(tokens_out, scores, strict=True):
            ids = [int(t) for t in row if t not in (0,)]
            if model.config.eos_id in ids:
                ids = ids[: ids.index(model.config.eos_id)]
            yield vocabulary.decode(ids), float(score)


def _pad_rows(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : min(len(row), length)] = row[:length]
    return out


def _task_examples(task_name: str, split: str, lengths: Mapping[str, int], max_examples: int):
    import seqio

    import tasks  # noqa: F401

    task = seqio.get_mixture_or_task(task_name)
    dataset = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1)
    return task, list(numpy_batches(dataset.take(max_examples)))


def _target_text(example: Mapping, vocabulary) -> str:
    if "targets_pretokenized" in example:
        return example["targets_pretokenized"].decode()
    return vocabulary.decode([int(t) for t in example["targets"] if t > 1])


@gin.configurable(module="e2s2_jax")
def evaluate(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model=gin.REQUIRED,
    objective=gin.REQUIRED,
    feature_converter=gin.REQUIRED,
    decode_config=gin.REQUIRED,
    batch_size: int = 32,
    split: str = "validation",
    checkpoint_step: int | None = None,
    eval_batches: int = 8,
    max_decode_examples: int = 64,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> dict[str, float]:
    """The objective's metrics on `split` and the task's SeqIO metrics on decoded outputs.

    Writes them to MODEL_DIR/eval (TensorBoard) and eval_metrics.jsonl at the checkpoint's
    step, prints them, and returns them.
    """

    from e2s2_jax.interop import params_io
    from e2s2_jax.training import partitioning

    if jax.process_count() > 1:
        raise ConfigError("eval runs on one process; launch it without --num_processes.")
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.create_mesh(*mesh_shape)
    params = _restore_params(model_dir, model, mesh, rules, checkpoint_step)
    step = checkpoint_step or params_io.newest_checkpoint_step(model_dir)
    batches = load_eval_batches(
        mixture_or_task_name,
        task_feature_lengths,
        split,
        batch_size,
        feature_converter,
        eval_batches,
        mesh,
        rules,
    )
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    results = _eval_metrics(
        make_eval_fns(model, objective, mesh, rules, param_shardings), params, batches
    )

    task, examples = _task_examples(
        mixture_or_task_name, split, task_feature_lengths, max_decode_examples
    )
    metric_fns = getattr(task, "predict_metric_fns", None) or getattr(task, "metric_fns", [])
    if metric_fns and examples:
        vocabulary = task.output_features["targets"].vocabulary
        rows = [e["inputs"] for e in examples]
        token_batches = [
            _pad_rows(rows[i : i + batch_size], task_feature_lengths["inputs"])
            for i in range(0, len(rows), batch_size)
        ]
        decoded = _decode_texts(model, params, decode_config, vocabulary, token_batches)
        # SeqIO's convention: the task's postprocess_fn sees each output with its example
        # (e.g. an edit metric's target becomes {source, reference}).
        predictions = [
            task.postprocess_fn(text, example=example, is_target=False)
            for (text, _), example in zip(decoded, examples, strict=True)
        ]
        targets = [
            task.postprocess_fn(_target_text(example, vocabulary), example=example, is_target=True)
            for example in examples
        ]
        for metric_fn in metric_fns:
            results.update({k: float(v) for k, v in metric_fn(targets, predictions).items()})
        for target, prediction in list(zip(targets, predictions, strict=True))[:3]:
            log(f"  target:     {str(target)[:100]}\n  prediction: {str(prediction)[:100]}")
    log(
        f"eval of step {step} on {mixture_or_task_name}:{split}: "
        + " ".join(f"{k} {v:.4g}" for k, v in results.items())
    )
    _write_eval_metrics(model_dir, step or 0, results)
    return results


def _write_eval_metrics(model_dir: str, step: int, results: Mapping[str, float]) -> None:
    """Appends `results` to MODEL_DIR's eval metrics; a MODEL_DIR that cannot be written (a
    finished run made read-only) gets a warning, the metrics having been printed already."""
    import tensorflow as tf

    from e2s2_jax.training.metrics_writer import MetricsWriter

    try:
        writer = MetricsWriter(model_dir, "eval", enabled=jax.process_index() == 0)
        writer.write(step, results)
        writer.close()
    except (OSError, tf.errors.OpError) as error:
        log(
            f"warning: eval metrics not written to {model_dir} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); they are printed above"
        )


@gin.configurable(module="e2s2_jax")
def infer(
    *,
    model_dir: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model=gin.REQUIRED,
    decode_config=gin.REQUIRED,
    output_file: str | None = None,
    mixture_or_task_name: str | None = None,
    input_file: str | None = None,
    vocabulary_model: str | None = None,
    split: str = "validation",
    batch_size: int = 32,
    max_examples: int = 1000,
    checkpoint_step: int | None = None,
    seed: int = 0,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> str:
    """Decodes a task's `split` inputs, or the lines of `input_file`, to JSON lines
    `{"input", "prediction", "score", "truncated"[, "target"][, "blank"]}` in `output_file`
    (default MODEL_DIR/inference.jsonl), one per input line and in order; returns its path.

    A blank input line gets an empty prediction, a null score and `"blank": true`; an input
    longer than `TASK_FEATURE_LENGTHS['inputs']` is cut to it, with `"truncated": true`. More
    inputs than `max_examples` are cut to it, with a warning.

    `input_file` lines are tokenized with the task's vocabulary when a task is given, else with
    `vocabulary_model` (a SentencePiece file), else with the bundled demo vocabulary.
    """
    from e2s2_jax.training import partitioning

    if jax.process_count() > 1:
        raise ConfigError("infer runs on one process; launch it without --num_processes.")
    if mixture_or_task_name is None and input_file is None:
        raise ConfigError(
            'infer needs an input: --gin.infer.input_file=\\"lines.txt\\" or '
            '--gin.infer.mixture_or_task_name=\\"a_task\\".'
        )
    output_file = output_file or os.path.join(model_dir, "inference.jsonl")
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.create_mesh(*mesh_shape)
    length = task_feature_lengths["inputs"]
    if input_file is not None:
        lines = _read_input_lines(input_file)  # bad bytes fail before the restore
        params = _restore_params(model_dir, model, mesh, rules, checkpoint_step)
        vocabulary = _infer_vocabulary(mixture_or_task_name, vocabulary_model)
        lines = _apply_limit(lines, max_examples, f"{input_file} has")
        rows = [np.asarray(vocabulary.encode(line) + [model.config.eos_id]) for line in lines]
        records = [
            {"input": line, "truncated": len(row) > length}
            for line, row in zip(lines, rows, strict=True)
        ]
    else:
        params = _restore_params(model_dir, model, mesh, rules, checkpoint_step)
        task, examples = _task_examples(
            mixture_or_task_name, split, task_feature_lengths, max_examples + 1
        )
        examples = _apply_limit(examples, max_examples, f"{mixture_or_task_name}:{split} has")
        vocabulary = task.output_features["targets"].vocabulary
        rows = [e["inputs"] for e in examples]
        records = [_task_record(e, vocabulary, length) for e in examples]
    # A blank line gets an empty prediction, marked, and is not decoded: output line i always
    # answers input line i.
    decode_rows = [
        row for row, record in zip(rows, records, strict=True) if record["input"].strip()
    ]
    token_batches = [
        _pad_rows(decode_rows[i : i + batch_size], length)
        for i in range(0, len(decode_rows), batch_size)
    ]
    outputs = _decode_texts(model, params, decode_config, vocabulary, token_batches, seed)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    truncated = 0
    with open(output_file, "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            if record["input"].strip():
                text, score = next(outputs)
                record = {**record, "prediction": text, "score": score}
            else:
                record = {**record, "prediction": "", "score": None, "blank": True}
            truncated += bool(record["truncated"])
            f.write(json.dumps(record) + "\n")
            if (i + 1) % (batch_size * 10) == 0:
                log(f"decoded {i + 1}/{len(records)}")
    if truncated:
        log(
            f"warning: {truncated} input(s) longer than TASK_FEATURE_LENGTHS['inputs']={length} "
            'tokens were cut to it (their records say "truncated": true)'
        )
    log(f"wrote {len(records)} predictions to {output_file}")
    return output_file


def _read_input_lines(path: str) -> list[str]:
    """The lines of `path` (UTF-8, line ends removed); bad bytes are a ConfigError naming the
    line."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as error:
        raise ConfigError(
            f"infer.input_file={path!r}: {error.strerror}; give a readable text file."
        ) from error
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}:{number}: line is not UTF-8 ({error.reason} at byte {error.start}); "
                "fix or remove that line (infer writes one output line per input line)."
            ) from error
    return lines


def _apply_limit(items: list, max_examples: int, source: str) -> list:
    """`items` cut to `max_examples`, saying so when that cuts anything."""
    if len(items) > max_examples:
        log(
            f"warning: {source} more than infer.max_examples={max_examples} inputs; decoding the "
            "first ones only (raise --gin.infer.max_examples to decode them all)"
        )
    return items[:max_examples]


def _task_record(example: Mapping, vocabulary, length: int) -> dict:
    """The output record of a task example, before its prediction: input, target, and whether
    the input was cut to `length` tokens (exact when the example keeps its text)."""
    record = {"input": vocabulary.decode([int(t) for t in example["inputs"] if t > 1])}
    if "inputs_pretokenized" in example:
        text = example["inputs_pretokenized"].decode()
        record["truncated"] = len(vocabulary.encode(text)) + 1 > length
    else:  # only the trimmed tokens: an input that fills the length may have been cut
        record["truncated"] = len(example["inputs"]) >= length
    if "targets" in example:
        record["target"] = vocabulary.decode([int(t) for t in example["targets"] if t > 1])
    return record


def _infer_vocabulary(task_name: str | None, vocabulary_model: str | None):
    import seqio

    if task_name is not None:
        import tasks  # noqa: F401

        return seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
    if vocabulary_model is not None:
        return seqio.SentencePieceVocabulary(vocabulary_model)
    from e2s2_jax.data.vocab import get_vocabulary

    return get_vocabulary()


# ----------------------------------------------------------------------------- entry


def initialize_distributed(args: argparse.Namespace) -> None:
    if args.num_processes and args.num_processes > 1:
        # Collectives between CPU devices of different processes (no effect on TPU / GPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.multihost:
        jax.distributed.initialize()


def _without_gin_call_notes(error: Exception) -> str:
    """The message without the `In call to configurable ...` lines Gin appends on the way up
    (the message names the binding already)."""
    lines = str(error).splitlines()
    return "\n".join(line for line in lines if not line.startswith("  In call to configurable"))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one job; returns the exit status (`e2s2_jax.errors`: 2 for bad input, 3 for a
    non-finite stop, 75 for a preempted run), with a one-line reason on stderr."""
    from e2s2_jax.training.checkpoints import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from e2s2_jax.interop import hf

        return hf.main(argv[1:]) or 0
    args, bindings = parse_flags(argv)
    try:
        initialize_distributed(args)  # before anything touches a JAX backend
        parse_gin(args.mode, args.gin_file, bindings, args.gin_search_paths)
        unused = gin_checks.check_macros(bindings)
        if unused:
            log(f"warning: macros bound in the Gin files but used by no binding: {unused}")
        gin_checks.check_integer_settings(
            args.mode, {"train": train, "evaluate": evaluate, "infer": infer}
        )
        if args.mode == "ssr-generate":
            from e2s2_jax.ssr.job import ssr_generate  # the SSR span-generation job

            ssr_generate()
        else:
            {"train": train, "eval": evaluate, "infer": infer}[args.mode]()
    except (ConfigError, CheckpointError) as error:
        print(f"error: {_without_gin_call_notes(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as error:
        prefix = "" if error.exit_status == EXIT_PREEMPTED else "error: "
        print(f"{prefix}{_without_gin_call_notes(error)}", file=sys.stderr)
        return error.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
