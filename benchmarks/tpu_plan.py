"""Per-chip memory of T5 1.1 train steps on TPU slices, from libtpu's compiler (compile-only);
prints JSON. The table behind RESULTS.md's "TPU memory plan".

Each case is one `python -m e2s2_jax.main compile` run (a subprocess: a fresh Gin config and
compiler per case) with the project's own Gin files: the model, `gin/runs/pretrain.gin`
(Adafactor, rsqrt schedule), an objective, bfloat16 activations, scanned layers, a remat
policy, inputs 512 / targets 114. Each report is kept in `--out_dir` as `<case>.json`, and a
case whose report is there is not compiled again: an interrupted plan resumes.
`--backend cpu` compiles the same cases on as many simulated CPU devices (XLA:CPU's buffer
assignment, the estimate `benchmarks/memory_plan.py` gives), for the comparison.

    python benchmarks/tpu_plan.py                      # every case, TPU
    python benchmarks/tpu_plan.py --case base_e2s2_v5e-256 --backend cpu

Compile-only: no step time, and the TPU runtime's own reservations are not included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = {
    "span_corruption": [],
    "e2s2": ["--gin_file=gin/objectives/e2s2.gin"],
    "surface_fusion": ["--gin_file=gin/models/surface_fusion.gin"],
}
# Compile-only devices per slice (`aot.tpu_devices`): a v4 device is a TensorCore (v4-256: 256
# devices, 128 chips), a v5p device a chip (v5p-128: 64).
DEVICES = {"v5e-256": 256, "v5p-128": 64, "v4-256": 256, "v4-64": 64, "v4-8": 8, "v5e-16": 16}
# The mesh a slice's cases use unless they say otherwise; a case on another mesh has it in its
# name (`_mesh1x256x1`). v5p-128 has none: its mesh is chosen per model.
DEFAULT_MESH = {
    "v5e-256": (-1, 8, 1),
    "v4-256": (-1, 8, 1),
    "v4-64": (-1, 8, 1),
    "v4-8": (-1, 8, 1),
}


def case(model, objective, topology, mesh, batch, remat="full", search=False):
    default = DEFAULT_MESH.get(topology, tuple(mesh))
    return {
        "name": f"{model}_{objective}_{topology}"
        + ("" if tuple(mesh) == default else "_mesh" + "x".join(str(size) for size in mesh))
        + ("" if remat == "full" else f"_{remat}"),
        "model": model,
        "objective": objective,
        "topology": topology,
        "mesh_shape": mesh,
        "batch_size": batch,
        "remat_policy": remat,
        "search": search,
    }


# In the order they run: the README's launch example first (base, v5e-256, global batch 2048,
# the three objectives; the largest-batch search for span corruption), then larger models at
# one batch each. A base compile takes 5-6 minutes on 2 busy cores, and a search 5-6 compiles.
CASES = [
    case("base", "span_corruption", "v5e-256", (-1, 8, 1), 2048, search=True),
    case("base", "e2s2", "v5e-256", (-1, 8, 1), 2048),
    case("base", "surface_fusion", "v5e-256", (-1, 8, 1), 2048),
    case("large", "span_corruption", "v5e-256", (-1, 8, 1), 2048),
    case("large", "e2s2", "v5e-256", (-1, 8, 1), 2048),
    case("xl", "span_corruption", "v5p-128", (-1, 64, 1), 1024),
    case("xl", "e2s2", "v5p-128", (-1, 64, 1), 1024),
    case("xxl", "span_corruption", "v5p-128", (-1, 16, 4), 512),
    # Remat: at 8 rows per chip `full` leaves most of the HBM unused; no remat (no recompute
    # in the backward pass) is the faster step if it fits.
    case("base", "e2s2", "v5e-256", (-1, 8, 1), 2048, remat="none"),
    case("base", "span_corruption", "v5e-256", (-1, 8, 1), 2048, remat="none"),
    case("base", "surface_fusion", "v5e-256", (-1, 8, 1), 2048, remat="none"),
    case("base", "span_corruption", "v4-8", (-1, 8, 1), 128, search=True),
    # v4: a pod slice of TensorCores, 8 rows per core, remat full and none.
    case("base", "span_corruption", "v4-64", (-1, 8, 1), 512),
    case("base", "e2s2", "v4-64", (-1, 8, 1), 512),
    case("base", "span_corruption", "v4-64", (-1, 8, 1), 512, remat="none"),
    case("base", "e2s2", "v4-64", (-1, 8, 1), 512, remat="none"),
    # Mesh: base E2S2 on v5e-256 with fsdp over every chip and with pure data parallelism,
    # beside the 32x8 above.
    case("base", "e2s2", "v5e-256", (1, 256, 1), 2048),
    case("base", "e2s2", "v5e-256", (-1, 1, 1), 2048),
    # Remat none for large: does it fit a 16 GiB v5e chip at 8 rows?
    case("large", "span_corruption", "v5e-256", (-1, 8, 1), 2048, remat="none"),
    case("large", "e2s2", "v5e-256", (-1, 8, 1), 2048, remat="none"),
    case("base", "span_corruption", "v4-256", (-1, 8, 1), 2048),
]


def command(spec: dict, backend: str, json_path: str, dump_hlo: str | None = None) -> list[str]:
    topology = spec["topology"] if backend == "tpu" else f"cpu:{DEVICES[spec['topology']]}"
    return [
        sys.executable,
        "-m",
        "e2s2_jax.main",
        "compile",
        f"--gin_file=gin/models/t5_1_1_{spec['model']}.gin",
        "--gin_file=gin/runs/pretrain.gin",
        *OBJECTIVES[spec["objective"]],
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}",
        "--gin.TRAIN_STEPS=524288",
        f"--gin.BATCH_SIZE={spec['batch_size']}",
        '--gin.ACTIVATION_DTYPE="bfloat16"',
        "--gin.SCAN_LAYERS=True",
        f'--gin.REMAT_POLICY="{spec["remat_policy"]}"',
        f"--gin.train.mesh_shape={tuple(spec['mesh_shape'])}",
        f"--topology={topology}",
        f"--json={json_path}",
        *([] if spec["search"] else ["--no_search"]),
        *([f"--dump_hlo={dump_hlo}/{spec['name']}.{backend}"] if dump_hlo else []),
        # The TPU budget for the CPU estimate's search: the same chip's HBM.
        *(["--hbm_gib=16" if "v5e" in spec["topology"] or "v4" in spec["topology"] else
           "--hbm_gib=95"] if backend == "cpu" else []),
    ]  # fmt: skip


def markdown_rows(out_dir: str) -> str:
    """One table row per case with a TPU report in `out_dir`; the CPU estimate beside it where
    that report exists too."""
    gib = lambda count: f"{count / 2**30:.2f}"
    lines = []
    for spec in CASES:
        reports = {}
        for backend in ("tpu", "cpu"):
            path = os.path.join(out_dir, f"{spec['name']}.{backend}.json")
            if os.path.exists(path):
                with open(path) as f:
                    reports[backend] = json.load(f)
        if "tpu" not in reports:
            continue
        tpu, cpu = reports["tpu"], reports.get("cpu")
        if "refused" in tpu:  # libtpu would not compile it: its temporaries exceed the HBM
            mesh = "x".join(str(size) for size in cpu["mesh"].values()) if cpu else "-"
            rows = f" ({cpu['rows_per_device']:g})" if cpu else ""
            lines.append(
                f"| {spec['model']} | {spec['objective']} | {spec['topology']} | {mesh} | "
                f"{spec['remat_policy']} | {spec['batch_size']}{rows} | - | "
                f"{gib(tpu['total_bytes'])} needed | - | **refused** / "
                f"{gib(tpu['available_bytes'])} | no | - | {tpu['compile_seconds']:.0f} | "
                f"{gib(cpu['total_bytes']) if cpu else '-'} |"
            )
            continue
        largest = tpu.get("largest_batch")
        best = (
            f"{largest['global_batch']} ({largest['global_batch'] // tpu['devices']} per device)"
            if largest and largest["verified"]
            else "-"
        )
        estimate = (
            f"{gib(cpu['total_bytes'])} ({cpu['total_bytes'] / tpu['total_bytes']:.2f}x)"
            if cpu
            else "-"
        )
        mesh = "x".join(str(size) for size in tpu["mesh"].values())
        lines.append(
            f"| {spec['model']} | {spec['objective']} | {spec['topology']} "
            f"({tpu['device_kind']}, {tpu['processes']} hosts) | {mesh} | "
            f"{spec['remat_policy']} | {tpu['global_batch']} ({tpu['rows_per_device']:g}) | "
            f"{gib(tpu['argument_bytes'])} | {gib(tpu['temp_bytes'])} | "
            f"{gib(tpu['peak_bytes'])} | **{gib(tpu['total_bytes'])}** / "
            f"{gib(tpu['hbm_bytes'])} | {'yes' if tpu['fits'] else 'no'} | {best} | "
            f"{tpu['compile_seconds']:.0f} | {estimate} |"
        )
    return "\n".join(lines)


COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) "
    r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def collectives(hlo: str) -> dict[str, dict]:
    """The collectives in an optimized HLO text, per kind: how many ops the text has, the bytes
    of their results per device in one step (an op in a while loop's body, such as the scanned
    layers', counted once per iteration: the trip count is the constant in the loop's
    condition), and the largest op's result. Result bytes, not link traffic, and a rough sum:
    libtpu's async collective fusions repeat an op in their start and continuation fusions, and
    each copy counts."""
    ops, calls, constants, name = {}, {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if header:
            name = "ENTRY" if line.startswith("ENTRY") else header.group(1)
            ops[name], calls[name] = [], []
            continue
        if name is None:
            continue
        constant = re.search(r" constant\((\d+)\)", line)
        if constant:
            constants.setdefault(name, int(constant.group(1)))
        loop = re.search(r"condition=%([^,\s]+), body=%([^,\s]+)", line)
        if loop:
            calls[name].append((loop.group(2), loop.group(1)))
        calls[name] += [(callee, None) for callee in re.findall(r" calls=%([^,\s]+)", line)]
        match = COLLECTIVE.search(line)
        if not match:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
        if match.group(3) and match.group(2) in ("all-gather", "collective-permute"):
            shapes = shapes[-1:]  # an async start's result is (operand, output)
        sizes = []
        for dtype, dims in shapes:
            size = BYTES.get(dtype, 8)
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            sizes.append((size, f"{dtype}[{dims}]"))
        ops[name].append((match.group(2), sizes))

    found = {}

    def visit(computation: str, times: int) -> None:
        for kind, sizes in ops.get(computation, []):
            entry = found.setdefault(kind, {"ops": 0, "bytes": 0, "largest": (0, "")})
            entry["ops"] += 1
            entry["bytes"] += times * sum(size for size, _ in sizes)
            entry["largest"] = max(entry["largest"], *sizes)
        for callee, condition in calls.get(computation, []):
            visit(callee, times * (constants.get(condition, 1) if condition else 1))

    visit("ENTRY", 1)
    return {
        kind: {**entry, "largest": entry["largest"][1]} for kind, entry in sorted(found.items())
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("tpu", "cpu"), default="tpu")
    parser.add_argument("--case", action="append", help="run only these case names")
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "benchmarks", "tpu_plan"))
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="compile nothing: print RESULTS.md's table rows of the reports in --out_dir",
    )
    parser.add_argument("--dump_hlo", help="keep each compiled case's optimized HLO under DIR")
    parser.add_argument(
        "--collectives",
        metavar="DIR",
        help="compile nothing: print the collectives of the HLO that --dump_hlo kept in DIR",
    )
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_rows(args.out_dir))
        return
    if args.collectives:
        for name in sorted(os.listdir(args.collectives)):
            path = os.path.join(args.collectives, name, "train_step.optimized.hlo.txt")
            if os.path.exists(path) and (not args.case or name.rsplit(".", 1)[0] in args.case):
                with open(path) as f:
                    print(json.dumps({"case": name, "collectives": collectives(f.read())}))
        return
    cases = [c for c in CASES if not args.case or c["name"] in args.case]
    os.makedirs(args.out_dir, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for spec in cases:
        path = os.path.join(args.out_dir, f"{spec['name']}.{args.backend}.json")
        if not os.path.exists(path):
            print(f"[tpu_plan] {spec['name']} ({args.backend}) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = subprocess.run(
                command(spec, args.backend, path + ".partial", args.dump_hlo),
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            # A step libtpu refuses as too large for the chip is an answer, not a failure:
            # `compile` reports it ("refused", the temporaries it needed).
            if result.returncode != 0:
                print(
                    f"[tpu_plan] {spec['name']} failed:\n{result.stderr[-3000:]}", file=sys.stderr
                )
                continue
            os.replace(path + ".partial", path)
            print(
                f"[tpu_plan] {spec['name']}: {time.perf_counter() - start:.0f} s\n" + result.stdout,
                file=sys.stderr,
                flush=True,
            )
        with open(path) as f:
            rows.append({**spec, "report": json.load(f)})
    print(
        json.dumps(
            {
                "backend": args.backend,
                "rows": rows,
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
