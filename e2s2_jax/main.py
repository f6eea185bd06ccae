"""The Gin-configured entry point, with t5x's conventions.

    python -m e2s2_jax.main train --gin_file=gin/models/t5_1_1_tiny.gin \\
        --gin_file=gin/runs/pretrain.gin --gin.MODEL_DIR=\\"/tmp/run\\" \\
        --gin.MIXTURE_OR_TASK_NAME=\\"bundled_span_corruption\\" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 128, 'targets': 32}" --gin.TRAIN_STEPS=1000
    python -m e2s2_jax.main eval  ... (same Gin files; `gin/runs/eval.gin`)
    python -m e2s2_jax.main infer ... (`gin/runs/infer.gin`; a task split or a text file)
    python -m e2s2_jax.main probe ... (`gin/runs/probe.gin`; a linear probe of the encoder)
    python -m e2s2_jax.main ssr-generate ... (`gin/runs/ssr_generate.gin`; SSR's generation job)
    python -m e2s2_jax.main score-tokens ... (`gin/runs/score_tokens.gin`; token informativeness)
    python -m e2s2_jax.main compile ... --topology=v4-128 (train's Gin files; the train step
        compiled ahead of time for a TPU slice: per-chip memory, the largest batch that fits)
    python -m e2s2_jax.main convert {import,export} ...   (Hugging Face <-> params; see --help)
    python -m e2s2_jax.main clusters ...  (C-RTS's token -> cluster table; see --help)

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
import sys
from collections.abc import Sequence

# Before TensorFlow loads (through the jobs' input pipelines): its C++ logs stay quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
import jax  # noqa: E402

import e2s2_jax.configurables  # noqa: E402, F401  (registers the Gin configurables)
from e2s2_jax import gin_checks, token_clusters  # noqa: E402
from e2s2_jax.console import console  # noqa: E402
from e2s2_jax.errors import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    TrainingStopped,
)
from e2s2_jax.inference import evaluate, infer  # noqa: E402
from e2s2_jax.interop import hf  # noqa: E402
from e2s2_jax.probe import probe  # noqa: E402
from e2s2_jax.self_evolution.job import score_tokens  # noqa: E402
from e2s2_jax.ssr.job import ssr_generate  # noqa: E402
from e2s2_jax.training import aot  # noqa: E402
from e2s2_jax.training.trainer import train  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.path.join(REPO_ROOT, "gin"), REPO_ROOT)
REQUIRED_MACROS = {
    "train": ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS"),
    "eval": ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS"),
    "infer": ("MODEL_DIR", "TASK_FEATURE_LENGTHS"),
    "probe": ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS"),
    "ssr-generate": (),  # its Gin file marks its own macros %gin.REQUIRED
    "score-tokens": (),  # likewise
    # train's Gin files; MODEL_DIR and MIXTURE_OR_TASK_NAME are not read (`COMPILE_DEFAULTS`).
    "compile": ("TASK_FEATURE_LENGTHS", "TRAIN_STEPS"),
}
# Bound before the command line's bindings (which override them): what compile never reads.
COMPILE_DEFAULTS = ('MODEL_DIR = "unused by compile"', 'MIXTURE_OR_TASK_NAME = "unused by compile"')
# The job each mode runs: Gin configurables (`train.batch_size = ...` in gin/runs/*.gin).
JOBS = {
    "train": train,
    "eval": evaluate,
    "infer": infer,
    "probe": probe,
    "ssr-generate": ssr_generate,
    "score-tokens": score_tokens,
}


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
    parser.add_argument("mode", choices=(*JOBS, "compile"))
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
    compile_flags = parser.add_argument_group("compile (ahead of time, no data or weights)")
    compile_flags.add_argument(
        "--topology",
        help="a TPU slice (v4-128, v5e-256, v5p-64, or v4:4x4x4), or cpu:N for N simulated "
        "CPU devices",
    )
    compile_flags.add_argument(
        "--batch_per_host", type=int, help="rows per host process (default: train.batch_size)"
    )
    compile_flags.add_argument(
        "--hbm_gib", type=float, help="memory per device to fit in (default: the chip's HBM)"
    )
    compile_flags.add_argument(
        "--no_search",
        dest="search",
        action="store_false",
        help="skip the search for the largest batch that fits",
    )
    compile_flags.add_argument("--dump_hlo", help="directory for the optimized HLO text")
    compile_flags.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(rest)
    if args.mode == "compile" and not args.topology:
        parser.error("compile needs --topology (e.g. --topology=v4-8, or cpu:8)")
    defaults = list(COMPILE_DEFAULTS) if args.mode == "compile" else []
    return args, [*defaults, *args.gin_bindings, *bindings]


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


def simulate_cpu_devices(topology: str) -> None:
    """For `--topology=cpu:N`: asks XLA for N host devices and its faster compile settings
    (before JAX starts its backend)."""
    name, _, count = topology.partition(":")
    if name == "cpu" and count:
        if not count.isdigit():
            raise ConfigError(f"--topology={topology}: use cpu:N with N a device count.")
        aot.request_cpu_devices(int(count))


def run_compile(args: argparse.Namespace) -> None:
    """`compile`: the train step compiled for `--topology`, reported on stdout."""
    report = aot.compile_train(
        args.topology,
        batch_per_host=args.batch_per_host,
        hbm_gib=args.hbm_gib,
        search=args.search,
        dump_hlo=args.dump_hlo,
        progress=lambda line: console.info(f"[compile] {line}"),
    )
    print("\n".join(aot.report_lines(report)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _without_gin_call_notes(error: Exception) -> str:
    """The message without the `In call to configurable ...` lines Gin appends on the way up
    (the message names the binding already)."""
    lines = str(error).splitlines()
    return "\n".join(line for line in lines if not line.startswith("  In call to configurable"))


def check_config(mode: str, bindings: Sequence[str]) -> None:
    """The checks on the parsed Gin configuration before any work: a warning for macros bound
    but read by no binding, a ConfigError for an integer setting of `mode` out of range."""
    unused = gin_checks.check_macros(bindings)
    if unused:
        console.warning(f"warning: macros bound in the Gin files but used by no binding: {unused}")
    gin_checks.check_integer_settings(
        mode,
        {
            "train": train,
            "evaluate": evaluate,
            "infer": infer,
            "probe": probe,
            "score_tokens": score_tokens,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one job; returns the exit status (`e2s2_jax.errors`: 2 for bad input, 3 for a
    non-finite stop, 75 for a preempted run), with a one-line reason on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        return hf.main(argv[1:]) or 0
    if argv and argv[0] == "clusters":
        return token_clusters.main(argv[1:])
    args, bindings = parse_flags(argv)
    try:
        if args.mode == "compile":
            simulate_cpu_devices(args.topology)
        initialize_distributed(args)  # before anything touches a JAX backend
        parse_gin(args.mode, args.gin_file, bindings, args.gin_search_paths)
        check_config(args.mode, bindings)
        if args.mode == "compile":
            run_compile(args)
        else:
            JOBS[args.mode]()
    except (ConfigError, CheckpointError) as error:
        # The exit reason is the command's result, not a log line (`console`): printed on
        # stderr by every process, since a process's bad input or damaged file is its own.
        print(f"error: {_without_gin_call_notes(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as error:
        prefix = "" if error.exit_status == EXIT_PREEMPTED else "error: "
        print(f"{prefix}{_without_gin_call_notes(error)}", file=sys.stderr)
        return error.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
