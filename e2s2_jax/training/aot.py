"""Ahead-of-time compilation of the train step for hardware this machine does not have
(`python -m e2s2_jax.main compile`): per-device memory from the real compiler, before booking.

A TPU slice is described by libtpu's compile-only client
(`jax.experimental.topologies.get_topology_desc`): its devices cannot run anything, but a mesh
over them lowers and compiles the project's train step with the TPU compiler, and
`compiled.memory_analysis()` gives the bytes each device needs. Nothing is materialised: the
train state is `jax.eval_shape` of the model and optimizer init, the batch is
`jax.ShapeDtypeStruct`s of the feature converter's model features; both reach the step with the
shardings `train` gives them.

What this does not give: step time (the compiler's cost model is not a timing), and the memory
the TPU runtime keeps for itself (programs, infeed, collectives' scratch outside the program):
leave headroom below the chip's HBM.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gin
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from e2s2_jax.errors import ConfigError
from e2s2_jax.training import partitioning
from e2s2_jax.training.train_state import train_state_shardings
from e2s2_jax.training.train_step import make_train_step

GiB = 1024**3

# HBM per compile-only device, by `device.device_kind`. Google's published per-chip HBM; a
# compile-only v4 device is one TensorCore (two per chip, `core_on_chip` 0 and 1; a v4 VM runs
# them as one "megacore" device with the chip's 32 GiB), so it gets half the chip. v5p is
# megacore in the compile-only client too (one device per chip).
HBM_BYTES = {
    "TPU v4": 16 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}

# Faster XLA:CPU compiles (`--topology=cpu:N`, benchmarks/memory_plan.py): these only change
# LLVM's optimisation of the generated machine code, after buffer assignment; the memory
# figures are identical with and without them (checked on large, 8x8x1) and a compile-only
# executable is never run.
FAST_CPU_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def request_cpu_devices(count: int) -> None:
    """Adds `--xla_force_host_platform_device_count=count` (unless XLA_FLAGS names a count
    already) and `FAST_CPU_COMPILE_FLAGS` not already set to XLA_FLAGS. XLA reads them when
    JAX creates its CPU backend (the first `jax.devices()`): call before that."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if not any("xla_force_host_platform_device_count" in flag for flag in flags):
        flags.append(f"--xla_force_host_platform_device_count={count}")
    for flag in FAST_CPU_COMPILE_FLAGS:
        if not any(flag.split("=")[0] in existing for existing in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)


# Cloud TPU accelerator types -> the compile-only topology name. v4 and v5p count TensorCores
# (two per chip, 3-D torus of chips); v5e and v6e count chips (2-D).
_TORUS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_TORUS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
# Accelerator-type prefix -> (topology generation, TensorCores counted per chip).
_GENERATIONS = {
    "v4": ("v4", 2),
    "v5p": ("v5p", 2),
    "v5e": ("v5e", 1),
    "v5litepod": ("v5e", 1),
    "v6e": ("v6e", 1),
}


def topology_name(spec: str) -> str:
    """The compile-only topology name of a Cloud TPU accelerator type: `v4-128` (128
    TensorCores, 64 chips) -> `v4:4x4x4`, `v5e-256` -> `v5e:16x16`; a `GENERATION:AxB[xC]`
    name is returned as it is. Raises ConfigError for anything else."""
    if ":" in spec:
        return spec
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", spec)
    if match:
        generation, cores_per_chip = _GENERATIONS[match.group(1)]
        chips, remainder = divmod(int(match.group(2)), cores_per_chip)
        shapes = _TORUS_3D if generation in ("v4", "v5p") else _TORUS_2D
        if not remainder and chips in shapes:
            return f"{generation}:{shapes[chips]}"
    raise ConfigError(
        f"--topology={spec}: not a TPU slice this knows; use an accelerator type (v4-8 ... "
        "v4-4096, v5p-8 ... v5p-8192, v5e-1 ... v5e-256, v6e-1 ... v6e-256) or a topology "
        "name GENERATION:CHIPS, e.g. v4:4x4x4 or v5e:2x2."
    )


def tpu_devices(spec: str) -> list[jax.Device]:
    """The compile-only devices of TPU slice `spec` (`topology_name`'s forms). Needs libtpu
    (`pip install -e '.[tpu]'`); raises ConfigError when it or the topology is missing."""
    name = topology_name(spec)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"--topology={spec}: compiling for a TPU needs libtpu, which is not installed: "
            "`pip install -e '.[tpu]'`, or run `./launch.sh compile ...`, which installs it."
        )
    # libtpu looks for a TPU VM's metadata server, accelerator type and worker list, and warns
    # at length when they are missing; here there are none. The compile-only topology comes
    # from `name` alone (these values do not change its devices or host processes).
    for variable, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_ACCELERATOR_TYPE", "v4-8"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_WORKER_ID", "0"),
        # libtpu takes /tmp/libtpu_lockfile so that two processes never open one TPU; a
        # compile-only client opens none, and two compiles (or a compile beside a run on a
        # TPU VM) may share the machine.
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(variable, value)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as error:  # whatever libtpu raises for a topology it does not know
        raise ConfigError(
            f"--topology={spec} ({name}): libtpu cannot describe this topology "
            f"({str(error).splitlines()[0]}); check the generation and the chip counts, e.g. "
            "v4:4x4x4 or v5e:2x2."
        ) from error


def hbm_bytes(device: jax.Device) -> int | None:
    """HBM per device of `device`'s kind (`HBM_BYTES`), or None for an unknown kind."""
    return HBM_BYTES.get(device.device_kind)


def format_bytes(count: int) -> str:
    """`12.34 GiB`, or `56.7 MiB` below a tenth of a GiB."""
    return f"{count / GiB:.2f} GiB" if abs(count) >= GiB / 10 else f"{count / 2**20:.1f} MiB"


def memory_summary(compiled) -> dict[str, int]:
    """`compiled.memory_analysis()` per device: argument (state + batch + rng), output (new
    state + metrics), alias (outputs written into donated arguments), temp (activations,
    gradients, gathered weights, scratch), the compiler's peak of live buffers and the size of
    the generated code; and `total_bytes`, the bytes the step needs.

    The backends account differently. XLA:CPU gives temp and leaves it out of its peak, so
    there the total is argument + output - alias + temp: every live buffer once (the donated
    state's new value lives in the old one's buffers, so it is in both argument and output
    and is subtracted once as alias). libtpu (0.0.42.1) reports temp as 0 and the live-buffer
    peak, arguments included, as `peak_memory_in_bytes`. `total_bytes` is the larger of the
    two, which is each backend's own figure.
    """
    stats = compiled.memory_analysis()
    summary = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "peak_bytes": int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
        "code_bytes": int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
    }
    buffers = (
        summary["argument_bytes"]
        + summary["output_bytes"]
        - summary["alias_bytes"]
        + summary["temp_bytes"]
    )
    summary["total_bytes"] = max(buffers, summary["peak_bytes"])
    return summary


# libtpu's answer for a step whose temporaries exceed the chip: it refuses to compile it.
_REFUSAL = re.compile(
    r"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refusal(error: Exception) -> dict[str, Any] | None:
    """`{"refused", "temp_required_bytes", "available_bytes"}` when `error` is the TPU
    compiler's refusal of a step too large for the chip (`RESOURCE_EXHAUSTED` ... HBM), else
    None. Its sizes are binary units ("15.75G" of a 16 GiB v5e chip)."""
    match = _REFUSAL.search(str(error))
    if match is None:
        return None
    required, required_unit, available, available_unit = match.groups()
    return {
        "refused": match.group(0),
        "temp_required_bytes": int(float(required) * _UNITS[required_unit]),
        "available_bytes": int(float(available) * _UNITS[available_unit]),
    }


def largest_fitting(
    total_bytes: Callable[[int], float],
    budget_bytes: int,
    known: Mapping[int, float],
    max_compiles=12,
) -> dict[str, Any]:
    """The largest batch (in units: `total_bytes(units)` is compiled memory, `math.inf` for a
    step the compiler refused) whose bytes fit `budget_bytes`, searched from the `known`
    `{units: bytes}` (at least two points).

    Total bytes are close to linear in the batch: each guess is where the line through the two
    compiled (not refused) points nearest to the budget reaches it, kept between the largest
    batch known to fit and the smallest known not to (and at most 4x the largest compiled so
    far); where the line points at or past a batch known not to fit (it was refused below the
    line's reach), or there is no line yet, the guess halves that interval instead. The search
    stops when those are adjacent, so the answer fits when compiled and one unit more does not
    (`verified`; 0 units: none fits), or after `max_compiles` compiles.
    """
    points = dict(known)
    fits, fails = 0, None
    for units, total in points.items():
        if total <= budget_bytes:
            fits = max(fits, units)
        elif fails is None or units < fails:
            fails = units
    compiles = 0
    while (fails is None or fails > fits + 1) and compiles < max_compiles:
        compiled = {u: t for u, t in points.items() if math.isfinite(t)}
        nearest = sorted(compiled.items(), key=lambda p: abs(p[1] - budget_bytes))[:2]
        if len(nearest) == 2:
            (u0, t0), (u1, t1) = sorted(nearest)
            slope = (t1 - t0) / (u1 - u0)
            guess = 2 * u1 if slope <= 0 else math.floor(u0 + (budget_bytes - t0) / slope)
        else:
            guess = 2 * max(points)
        if fails is not None and guess >= fails:
            guess = (fits + fails) // 2
        # A nearly flat line (the state dwarfs the activations) points far away: grow at most
        # fourfold per compile, so that no guess costs more than a few times a known compile.
        high = fails - 1 if fails is not None else max(4 * max(points), fits + 1)
        guess = min(max(guess, fits + 1), high)
        points[guess] = total_bytes(guess)
        compiles += 1
        if points[guess] <= budget_bytes:
            fits = guess
        else:
            fails = guess
    return {"units": fits, "verified": fails == fits + 1, "first_too_large": fails}


@dataclass
class TrainStepCompiler:
    """The train step of one Gin run on one mesh, compiled ahead of time at any global batch.

    The same pieces `train` builds (mesh from `mesh_shape`, state shardings from the logical
    axis rules, `make_train_step` with the run's objective, optimizer, schedule and
    microbatches), over `devices` instead of the local ones. Results are cached by batch size.
    """

    model: Any
    optimizer: Any
    objective: Any
    feature_converter: Any
    task_feature_lengths: Mapping[str, int]
    devices: Sequence[jax.Device]
    mesh_shape: Sequence[int] = (-1, 1, 1)
    num_microbatches: int = 1
    learning_rate_schedule: Any = None
    progress: Callable[[str], None] | None = None
    _cache: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.mesh = partitioning.job_mesh(
            "train", self.mesh_shape, num_microbatches=self.num_microbatches, devices=self.devices
        )
        abstract_state, self.state_shardings = train_state_shardings(
            self.model, self.optimizer, self.mesh
        )
        self.abstract_state = abstract_state
        self.step = make_train_step(
            self.model,
            self.optimizer,
            self.objective,
            self.mesh,
            self.num_microbatches,
            learning_rate_fn=self.learning_rate_schedule,
            state_shardings=self.state_shardings,
        )
        self.processes = len({device.process_index for device in self.devices})
        data_parallel = partitioning.data_parallel_size(self.mesh)
        # The smallest global batch every split of `train` accepts: equal shares per input
        # process, and per microbatch per data-parallel device.
        self.batch_granule = math.lcm(data_parallel * self.num_microbatches, self.processes)
        self.data_parallel = data_parallel
        self.parameters = sum(x.size for x in jax.tree.leaves(abstract_state.params))

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """`[batch_size, length]` int32 model features of the run's feature converter."""
        lengths = self.feature_converter.get_model_feature_lengths(self.task_feature_lengths)
        return {
            name: jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
            for name, length in lengths.items()
        }

    def check_batch_size(self, batch_size: int, setting: str = "train.batch_size") -> None:
        partitioning.check_batch_size(
            batch_size,
            self.mesh,
            self.num_microbatches,
            num_processes=self.processes,
            setting=setting,
        )

    def lower(self, batch_size: int):
        self.check_batch_size(batch_size)
        rng = jax.eval_shape(lambda: jax.random.key(0))
        rng = jax.ShapeDtypeStruct(
            rng.shape, rng.dtype, sharding=NamedSharding(self.mesh, PartitionSpec())
        )
        return self.step.lower(self.abstract_state, self.abstract_batch(batch_size), rng)

    def compile(self, batch_size: int, *, keep: bool = False):
        """XLA's `Compiled` train step at `batch_size` rows (global). Records its memory
        (`memory`); `keep=False` drops the executable afterwards. A step the compiler refuses
        as too large for the chip (`refusal`) is recorded as such, with the temporaries it
        needed as its `total_bytes`, and gives None."""
        start = time.perf_counter()
        try:
            compiled = self.lower(batch_size).compile()
        except Exception as error:  # only the compiler's refusal is an answer: others raise
            refused = refusal(error)
            if refused is None:
                raise
            compiled, result = None, {**refused, "total_bytes": refused["temp_required_bytes"]}
        else:
            result = memory_summary(compiled)
        seconds = time.perf_counter() - start
        result["compile_seconds"] = round(seconds, 1)
        self._cache[batch_size] = result
        if self.progress:
            outcome = "refused, needs" if "refused" in result else "compiled,"
            self.progress(
                f"global batch {batch_size} {outcome} {format_bytes(result['total_bytes'])} per "
                f"device ({seconds:.0f} s)"
            )
        return compiled if keep else None

    def judged_bytes(self, batch_size: int) -> float:
        """The step's bytes at `batch_size`, `math.inf` for a refused step: it does not fit
        whatever the budget (libtpu's own limit, e.g. 15.75 G of a v5e chip's 16 GiB, is
        below the chip's HBM, and its figure is of temporaries only)."""
        result = self.memory(batch_size)
        return math.inf if "refused" in result else result["total_bytes"]

    def memory(self, batch_size: int) -> dict[str, Any]:
        """`memory_summary` of the step at `batch_size` plus `compile_seconds` (cached)."""
        if batch_size not in self._cache:
            self.compile(batch_size)
        return self._cache[batch_size]

    def compiled_batches(self) -> dict[int, dict[str, Any]]:
        return dict(sorted(self._cache.items()))

    def largest_batch(self, budget_bytes: int, start_batch: int) -> dict[str, Any]:
        """The largest global batch (a multiple of `batch_granule`) whose step fits
        `budget_bytes` per device; compiles `start_batch` and twice it first."""
        granule = self.batch_granule
        units = max(1, start_batch // granule)
        for size in (units, 2 * units):
            self.memory(size * granule)
        known = {
            batch // granule: self.judged_bytes(batch)
            for batch in self._cache
            if batch % granule == 0
        }
        found = largest_fitting(
            lambda units: self.judged_bytes(units * granule), budget_bytes, known
        )
        first_too_large = found["first_too_large"]
        return {
            "global_batch": found["units"] * granule,
            "verified": found["verified"],
            "first_too_large": None if first_too_large is None else first_too_large * granule,
            "granule": granule,
        }


def devices_for(topology: str) -> list[jax.Device]:
    """`cpu` / `cpu:N`: this machine's CPU devices (N simulated ones: `main` sets
    `--xla_force_host_platform_device_count` before JAX starts); anything else: a TPU slice
    (`tpu_devices`)."""
    if topology == "cpu" or topology.startswith("cpu:"):
        count = int(topology.partition(":")[2] or jax.local_device_count("cpu"))
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ConfigError(
                f"--topology={topology}: {len(devices)} CPU devices visible; set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts."
            )
        return devices[:count]
    return tpu_devices(topology)


def train_settings() -> dict[str, Any]:
    """The arguments Gin would pass to `train` now (its bindings over its defaults); raises
    ConfigError naming a required one that is unbound."""
    from e2s2_jax.training.trainer import train

    settings = {
        name: parameter.default for name, parameter in inspect.signature(train).parameters.items()
    }
    settings.update(gin.get_bindings(train))
    missing = [name for name, value in settings.items() if value is gin.REQUIRED]
    if missing:
        raise ConfigError(
            f"train's {missing} are not bound: compile reads the same Gin files as train (a "
            "model file, a run file such as gin/runs/pretrain.gin, an objective)."
        )
    return settings


def compiler_for_train(
    devices: Sequence[jax.Device], progress: Callable[[str], None] | None = None
) -> tuple[TrainStepCompiler, int]:
    """The `TrainStepCompiler` of the Gin-configured `train` over `devices`, and its batch."""
    settings = train_settings()
    compiler = TrainStepCompiler(
        model=settings["model"],
        optimizer=settings["optimizer"],
        objective=settings["objective"],
        feature_converter=settings["feature_converter"],
        task_feature_lengths=settings["task_feature_lengths"],
        devices=devices,
        mesh_shape=settings["mesh_shape"],
        num_microbatches=settings["num_microbatches"],
        learning_rate_schedule=settings["learning_rate_schedule"],
        progress=progress,
    )
    return compiler, settings["batch_size"]


def compile_train(
    topology: str,
    *,
    batch_per_host: int | None = None,
    hbm_gib: float | None = None,
    search: bool = True,
    dump_hlo: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compiles the Gin-configured train step for `topology` (`devices_for`) at
    `train.batch_size` (or `batch_per_host` rows per host process) and returns the report:
    per-device bytes against the device's HBM (`hbm_gib` overrides it), whether it fits, the
    compile time, and (`search`) the largest global batch that fits. `dump_hlo`: a directory
    for the optimized HLO text of the compiled step."""
    start = time.perf_counter()
    devices = devices_for(topology)
    compiler, batch_size = compiler_for_train(devices, progress)
    if batch_per_host is not None:
        batch_size = batch_per_host * compiler.processes
    setting = "--batch_per_host" if batch_per_host is not None else "train.batch_size"
    compiler.check_batch_size(batch_size, setting=setting)
    budget = int(hbm_gib * GiB) if hbm_gib is not None else hbm_bytes(devices[0])
    compiled = compiler.compile(batch_size, keep=True)
    memory = compiler.memory(batch_size)
    if dump_hlo and compiled is not None:
        os.makedirs(dump_hlo, exist_ok=True)
        path = os.path.join(dump_hlo, "train_step.optimized.hlo.txt")
        with open(path, "w") as f:
            f.write(compiled.as_text())
        memory["hlo_path"] = path
    del compiled
    report = {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": compiler.processes,
        "mesh": dict(compiler.mesh.shape),
        "parameters": int(compiler.parameters),
        "global_batch": batch_size,
        "batch_per_host": batch_size // compiler.processes,
        "rows_per_device": batch_size / compiler.data_parallel,
        "num_microbatches": compiler.num_microbatches,
        "hbm_bytes": budget,
        **memory,
    }
    if budget is not None:
        report["fits"] = compiler.judged_bytes(batch_size) <= budget
        if search:
            report["largest_batch"] = compiler.largest_batch(budget, batch_size)
            report["compiled"] = compiler.compiled_batches()
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """`compile_train`'s report for people: one line per fact."""
    to_gib = format_bytes
    lines = [
        f"{report['topology']}: {report['devices']} x {report['device_kind']} "
        f"({report['processes']} host process(es)), mesh {report['mesh']}, "
        f"{report['parameters']:,} parameters",
        f"global batch {report['global_batch']} ({report['batch_per_host']} per host, "
        f"{report['rows_per_device']:g} rows per data-parallel device, "
        f"{report['num_microbatches']} microbatch(es)); compiled in "
        f"{report['compile_seconds']:.0f} s",
    ]
    if "refused" in report:
        lines.append(
            f"refused by the compiler: its temporaries need {to_gib(report['total_bytes'])} per "
            f"device, {to_gib(report['available_bytes'])} available ({report['refused']})"
        )
    else:
        lines.append(
            f"per device: total {to_gib(report['total_bytes'])}; arguments "
            f"{to_gib(report['argument_bytes'])}, output {to_gib(report['output_bytes'])} (of "
            f"which {to_gib(report['alias_bytes'])} reuse donated arguments), temp "
            f"{to_gib(report['temp_bytes'])}, compiler's peak {to_gib(report['peak_bytes'])}, "
            f"generated code {to_gib(report['code_bytes'])}"
        )
    budget = report["hbm_bytes"]
    if budget is None:
        lines.append(f"HBM of a {report['device_kind']} device unknown: give --hbm_gib")
    elif report["fits"]:
        lines.append(
            f"fits in {to_gib(budget)} HBM ({to_gib(budget - report['total_bytes'])} free)"
        )
    elif "refused" in report:
        lines.append(f"does not fit in {to_gib(budget)} HBM")
    else:
        lines.append(
            f"does not fit in {to_gib(budget)} HBM by {to_gib(report['total_bytes'] - budget)}"
        )
    largest = report.get("largest_batch")
    if largest:
        verified = "verified: it fits and" if largest["verified"] else "not verified:"
        lines.append(
            f"largest global batch that fits: {largest['global_batch']} ({verified} "
            f"{largest['first_too_large']} does not; batches step by {largest['granule']})"
        )
    if "hlo_path" in report:
        lines.append(f"optimized HLO: {report['hlo_path']}")
    lines.append("compile-only: no step time; the TPU runtime's own reservations are not included.")
    return lines
