"""Per-device memory of the T5 1.1 train step on meshes we do not have, from XLA's ahead-of-time
compile; prints JSON.

Nothing is materialised: the train state is `jax.eval_shape` of the model and optimizer init,
and state, batch and rng reach `make_train_step(...).lower` as `jax.ShapeDtypeStruct`s carrying
their `NamedSharding`s on a mesh of simulated host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set by this script before JAX creates its
backend; one process with the largest device count serves every mesh, each mesh taking the first
`data * fsdp * model` devices). The step is the project's own: Seq2SeqObjective (T5's loss,
z-loss 1e-4), Adafactor with `rsqrt_schedule`, donated state, one microbatch.

Per device, each row reports:
- `param_bytes`, `optimizer_bytes`: exact, from the shard shape of each leaf's NamedSharding
  (float32 params; Adafactor's factored second moments).
- `gradient_bytes`: the float32 gradients in the params' layout (= `param_bytes`). They live
  inside XLA's temp allocation; shown for reference and never added again.
- `xla`: `compiled.memory_analysis()`: argument (state + batch + rng), output (new state +
  metrics), alias (outputs written in place into donated arguments: the whole new state) and
  temp (activations, gathered fsdp weights, gradients, optimizer scratch) bytes.
- `total_bytes = argument + output - alias + temp`: every live buffer once. Because the state is
  donated, the new state occupies the old state's buffers, so its bytes appear in both
  `argument` and `output` and are subtracted once as `alias`. (XLA's `peak_memory_in_bytes` is
  not used: on the CPU backend it leaves out the temp allocation.)

Largest batch per device for each memory budget (16 GiB for TPU v4, 80 GiB for H100): total
bytes are close to linear in the batch, so the step is compiled at two batch sizes, a line is
fitted and its prediction compiled; the search then keeps the largest batch known to fit and the
smallest known not to, guesses between them from the line through the two compiled points
nearest to the budget, and stops when they are adjacent: `max_batch` fits when compiled and
`max_batch + 1` does not (both verified by compiling). `batch_per_device` counts the rows each
device holds: the global batch divided by `data * fsdp` (model-parallel devices share rows).

This is the buffer assignment of XLA's CPU backend for the SPMD-partitioned HLO of the step: an
estimate of TPU or GPU memory, not a measurement on them. Those backends fuse, schedule and
(for bfloat16 matmuls) normalise types differently, overlap collectives with buffers of their
own and reserve memory for the runtime; leave headroom. The JSON says `"backend": "cpu"`.

    python benchmarks/memory_plan.py                       # base, large, xl, xxl on 8/64/256
    python benchmarks/memory_plan.py --quick               # tiny model, fsdp 8
    python benchmarks/memory_plan.py --case xl:1x64x1 --case xxl:1x64x4 [--batch_per_device 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from e2s2_jax.training import aot  # noqa: E402

GiB = 1024**3
BUDGETS = {"16GiB_tpu_v4": 16 * GiB, "80GiB_h100": 80 * GiB}
# (model, (data, fsdp, model)). Params shard over fsdp (ZeRO-3); base and large stop at fsdp 8
# and add plain data parallelism (their state is small, and wider fsdp only adds all-gathers);
# xl shards over 64; xxl adds 4-way tensor parallelism at 256 devices.
DEFAULT_CASES = (
    ("base", (1, 8, 1)),
    ("base", (8, 8, 1)),
    ("base", (32, 8, 1)),
    ("large", (1, 8, 1)),
    ("large", (8, 8, 1)),
    ("large", (32, 8, 1)),
    ("xl", (1, 8, 1)),
    ("xl", (1, 64, 1)),
    ("xl", (4, 64, 1)),
    ("xxl", (1, 8, 1)),
    ("xxl", (1, 64, 1)),
    ("xxl", (1, 64, 4)),
)
QUICK_CASES = (("tiny", (1, 8, 1)),)
# The packed features Seq2SeqObjective reads (positions are not: jit would prune them anyway).
FEATURES = (
    "encoder_input_tokens",
    "encoder_segment_ids",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
)


def ensure_host_devices(count: int) -> None:
    """Asks XLA's CPU backend for `count` devices (unless XLA_FLAGS already names a count) and
    adds `aot.FAST_CPU_COMPILE_FLAGS` not already set.

    Must run before JAX creates its backend (the first `jax.devices()`); raises RuntimeError when
    fewer devices are visible afterwards.
    """
    aot.request_cpu_devices(count)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if jax.device_count() < count:
        raise RuntimeError(
            f"{jax.device_count()} devices visible, {count} needed: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts."
        )


def model_gin_path(model: str) -> str:
    """`gin/models/t5_1_1_<model>.gin`, or `model` itself when it is a path."""
    if model.endswith(".gin"):
        return model
    return os.path.join(REPO_ROOT, "gin", "models", f"t5_1_1_{model}.gin")


def load_config(
    model_gin: str,
    *,
    activation_dtype: str,
    scan_layers: bool,
    remat_policy: str,
    gin_bindings: Sequence[str] = (),
):
    """The file's MODEL_CONFIG (a T5Config) with its ACTIVATION_DTYPE, SCAN_LAYERS and
    REMAT_POLICY macros overridden, then `gin_bindings` applied (without TensorFlow)."""
    from benchmarks._common import model_config

    bindings = [
        f'ACTIVATION_DTYPE = "{activation_dtype}"',
        f"SCAN_LAYERS = {scan_layers}",
        f'REMAT_POLICY = "{remat_policy}"',
        *gin_bindings,
    ]
    return model_config([model_gin], bindings)


def sharded_bytes(structs: Any, shardings: Any) -> int:
    """Bytes one device holds of `structs`: each leaf's shard shape (from its sharding) times its
    item size. The rules only split dimensions the mesh divides, so every device holds as much."""
    total = 0
    for struct, sharding in zip(jax.tree.leaves(structs), jax.tree.leaves(shardings), strict=True):
        shard_shape = sharding.shard_shape(tuple(struct.shape))
        total += math.prod(shard_shape) * np.dtype(struct.dtype).itemsize
    return total


def _with_shardings(structs: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda struct, sharding: jax.ShapeDtypeStruct(
            struct.shape, struct.dtype, sharding=sharding
        ),
        structs,
        shardings,
    )


class StepPlanner:
    """Compiles the train step of one model on one mesh at any batch size, caching results."""

    def __init__(
        self,
        config,
        mesh_shape: tuple[int, int, int],
        *,
        inputs_length: int = 512,
        targets_length: int = 114,
        progress_label: str = "",
    ):
        from e2s2_jax.models.t5 import T5
        from e2s2_jax.objectives import Seq2SeqObjective
        from e2s2_jax.training import optimizers, partitioning
        from e2s2_jax.training.train_state import train_state_shardings
        from e2s2_jax.training.train_step import make_train_step

        self.config = config
        self.mesh_shape = tuple(mesh_shape)
        self.inputs_length = inputs_length
        self.targets_length = targets_length
        self.progress_label = progress_label
        devices = jax.devices()[: math.prod(mesh_shape)]
        self.mesh = partitioning.create_mesh(*mesh_shape, devices=devices)
        self.data_parallel = partitioning.data_parallel_size(self.mesh)
        model = T5(config)
        optimizer = optimizers.make_optimizer("adafactor", optimizers.rsqrt_schedule())
        abstract_state, self.state_shardings = train_state_shardings(model, optimizer, self.mesh)
        self.abstract_state = _with_shardings(abstract_state, self.state_shardings)
        self.step = make_train_step(
            model,
            optimizer,
            Seq2SeqObjective(),
            self.mesh,
            state_shardings=self.state_shardings,
        )
        self.batch_sharding = partitioning.batch_sharding(self.mesh)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        rng = jax.eval_shape(lambda: jax.random.key(0))
        self.rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
        self.parameters = int(sum(x.size for x in jax.tree.leaves(abstract_state.params)))
        self.param_bytes = sharded_bytes(abstract_state.params, self.state_shardings.params)
        self.optimizer_bytes = sharded_bytes(
            abstract_state.opt_state, self.state_shardings.opt_state
        )
        self._cache: dict[int, dict[str, Any]] = {}

    def abstract_batch(self, batch_per_device: int) -> dict[str, jax.ShapeDtypeStruct]:
        """`[batch_per_device * data_parallel, length]` int32 features, split over the batch
        axes."""
        rows = batch_per_device * self.data_parallel
        lengths = {"encoder": self.inputs_length, "decoder": self.targets_length}
        return {
            name: jax.ShapeDtypeStruct(
                (rows, lengths[name.split("_")[0]]), jnp.int32, sharding=self.batch_sharding
            )
            for name in FEATURES
        }

    def memory(self, batch_per_device: int) -> dict[str, Any]:
        """XLA's per-device memory analysis of the step compiled at `batch_per_device`:
        argument / output / alias / temp bytes, `total_bytes` and `compile_seconds`."""
        if batch_per_device in self._cache:
            return self._cache[batch_per_device]
        start = time.perf_counter()
        lowered = self.step.lower(
            self.abstract_state, self.abstract_batch(batch_per_device), self.rng
        )
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
        result = aot.memory_summary(compiled)
        result["compile_seconds"] = round(seconds, 1)
        self._cache[batch_per_device] = result
        print(
            f"[memory_plan] {self.progress_label} mesh {self.mesh_shape} batch/device "
            f"{batch_per_device}: total {result['total_bytes'] / GiB:.3f} GiB, temp "
            f"{result['temp_bytes'] / GiB:.3f} GiB, compiled in {seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return result

    def compiled_points(self) -> list[tuple[int, int]]:
        """`(batch_per_device, total_bytes)` of every compile so far, by batch."""
        return sorted((batch, result["total_bytes"]) for batch, result in self._cache.items())

    def max_batch(self, budget_bytes: int, max_compiles: int = 12) -> dict[str, Any]:
        """The largest batch per device whose total bytes fit `budget_bytes` (0: none does).

        `verified` is true when `max_batch` fits (or is 0) and `max_batch + 1` does not, both
        compiled; the search is described in the module docstring.
        """
        found = aot.largest_fitting(
            lambda batch: self.memory(batch)["total_bytes"],
            budget_bytes,
            dict(self.compiled_points()),
            max_compiles,
        )
        return {
            "max_batch": found["units"],
            "verified": found["verified"],
            "first_too_large": found["first_too_large"],
        }


def plan_row(
    model: str,
    mesh_shape: tuple[int, int, int],
    *,
    batch_per_device: int = 8,
    fit_batch_per_device: int | None = None,
    inputs_length: int = 512,
    targets_length: int = 114,
    activation_dtype: str = "bfloat16",
    scan_layers: bool = True,
    remat_policy: str = "full",
    budgets: Mapping[str, int] = BUDGETS,
    gin_bindings: Sequence[str] = (),
) -> dict[str, Any]:
    """One row of the plan: sizes, per-device bytes at `batch_per_device`, the linear fit and
    the largest batch per device for each budget.

    `model` is a size (`base`, `xxl`, ...) or a model gin file. The line is fitted through
    `batch_per_device` and `fit_batch_per_device` (twice it by default).
    """
    gin_file = model_gin_path(model)
    config = load_config(
        gin_file,
        activation_dtype=activation_dtype,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        gin_bindings=gin_bindings,
    )
    start = time.perf_counter()
    name = os.path.basename(gin_file).removesuffix(".gin").removeprefix("t5_1_1_")
    planner = StepPlanner(
        config,
        mesh_shape,
        inputs_length=inputs_length,
        targets_length=targets_length,
        progress_label=name,
    )
    at_batch = planner.memory(batch_per_device)
    second = fit_batch_per_device or 2 * batch_per_device
    at_second = planner.memory(second)
    slope = (at_second["total_bytes"] - at_batch["total_bytes"]) / (second - batch_per_device)
    fixed = at_batch["total_bytes"] - slope * batch_per_device
    max_batch = {label: planner.max_batch(budget) for label, budget in budgets.items()}
    for label, budget in budgets.items():
        max_batch[label]["budget_bytes"] = budget
        max_batch[label]["linear_fit_prediction"] = (
            max(0, int(math.floor((budget - fixed) / slope))) if slope > 0 else None
        )
    return {
        "model": name,
        "model_gin": os.path.relpath(gin_file, REPO_ROOT),
        "parameters": planner.parameters,
        "devices": math.prod(mesh_shape),
        "mesh": dict(zip(("data", "fsdp", "model"), mesh_shape, strict=True)),
        "inputs_length": inputs_length,
        "targets_length": targets_length,
        "activation_dtype": config.dtype,
        "param_dtype": "float32",
        "scan_layers": config.scan_layers,
        "remat_policy": config.remat_policy,
        "batch_per_device": batch_per_device,
        "global_batch": batch_per_device * planner.data_parallel,
        "param_bytes": planner.param_bytes,
        "optimizer_bytes": planner.optimizer_bytes,
        "gradient_bytes": planner.param_bytes,
        "xla": at_batch,
        "total_bytes": at_batch["total_bytes"],
        "linear_fit": {
            "batches": [batch_per_device, second],
            "fixed_bytes": int(fixed),
            "bytes_per_example": int(slope),
        },
        "max_batch_per_device": max_batch,
        "compiled": [
            {"batch_per_device": batch, **planner.memory(batch)}
            for batch, _ in planner.compiled_points()
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }


def parse_case(text: str) -> tuple[str, tuple[int, int, int]]:
    """`"xxl:1x64x4"` -> `("xxl", (1, 64, 4))` (model, then data x fsdp x model)."""
    model, _, mesh = text.partition(":")
    sizes = tuple(int(size) for size in mesh.split("x"))
    if not model or len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: use MODEL:DATAxFSDPxMODEL, e.g. xl:1x64x1")
    return model, sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--case",
        type=parse_case,
        action="append",
        help="MODEL:DATAxFSDPxMODEL (repeatable); MODEL is a size or a gin file. Default: "
        "base, large, xl and xxl on 8, 64 and 256 devices.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model on fsdp 8 only")
    parser.add_argument("--batch_per_device", type=int, default=8)
    parser.add_argument("--fit_batch_per_device", type=int, default=None)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--activation_dtype", default="bfloat16")
    parser.add_argument("--remat_policy", default="full")
    parser.add_argument("--no_scan_layers", dest="scan_layers", action="store_false")
    parser.add_argument("--gin_binding", action="append", default=[])
    args = parser.parse_args(argv)

    cases = args.case or (QUICK_CASES if args.quick else DEFAULT_CASES)
    ensure_host_devices(max(math.prod(mesh) for _, mesh in cases))
    start = time.perf_counter()
    rows = [
        plan_row(
            model,
            mesh,
            batch_per_device=args.batch_per_device,
            fit_batch_per_device=args.fit_batch_per_device,
            inputs_length=args.inputs_length,
            targets_length=args.targets_length,
            activation_dtype=args.activation_dtype,
            scan_layers=args.scan_layers,
            remat_policy=args.remat_policy,
            gin_bindings=args.gin_binding,
        )
        for model, mesh in cases
    ]
    print(
        json.dumps(
            {
                "backend": jax.default_backend(),
                "note": "XLA CPU-backend buffer assignment of the SPMD-partitioned train step on "
                "simulated host devices: an estimate of TPU/GPU memory, not a measurement. "
                "total = argument + output - alias + temp (donated state counted once).",
                "optimizer": "adafactor, no momentum; second moments factored where both of a "
                "parameter's two largest dims are >= 128",
                "objective": "Seq2SeqObjective",
                "budgets_bytes": BUDGETS,
                "max_batch_method": "linear fit of total bytes at two batch sizes, then compiles "
                "until max_batch fits and max_batch + 1 does not",
                "rows": rows,
                "seconds": round(time.perf_counter() - start, 1),
                "simulated_devices": jax.device_count(),
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "python": platform.python_version(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
