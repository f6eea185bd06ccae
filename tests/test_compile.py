"""`python -m e2s2_jax.main compile`: the train step compiled ahead of time by libtpu's TPU
compiler for slices this machine does not have (`e2s2_jax/training/aot.py`).

Each compile runs `main` in a subprocess, as a user would, with the tiny model at short lengths
(a TPU compile of it takes 10-30 s here). References are computed here: the parameter count
from the T5 1.1 architecture, the state's bytes from it, the search's answer from the compiled
points themselves.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import eight_devices
import pytest

from e2s2_jax.errors import ConfigError
from e2s2_jax.training import aot

REPO = eight_devices.REPO_ROOT
TINY = {"vocab": 8192, "d_model": 64, "d_ff": 128, "heads": 4, "d_kv": 16, "layers": 2}
LENGTHS = "{'inputs': 64, 'targets': 16}"
BUDGET_GIB = 0.05  # the tiny step's ~40 MiB at 2 rows per device grows past it by ~64 rows
RUN = [
    "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin_file=gin/runs/pretrain.gin",
    f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
    "--gin.TRAIN_STEPS=100",
]


def _compile(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=eight_devices.xla_flags())
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "e2s2_jax.main", "compile", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _tiny_parameters() -> int:
    """T5 1.1 (gated GELU, untied output, relative-position tables per stack) of `TINY`."""
    v, d, f = TINY["vocab"], TINY["d_model"], TINY["d_ff"]
    attention = 4 * d * TINY["heads"] * TINY["d_kv"]
    mlp = 3 * d * f
    encoder_layer = attention + mlp + 2 * d
    decoder_layer = 2 * attention + mlp + 3 * d
    relpos = 32 * TINY["heads"]
    layers = TINY["layers"]
    stacks = layers * (encoder_layer + decoder_layer) + 2 * (d + relpos)
    return 2 * v * d + stacks


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compile")
    report_path = tmp_path / "report.json"
    result = _compile(
        tmp_path,
        *RUN,
        "--gin.BATCH_SIZE=8",
        "--topology=v5e:2x2",
        f"--hbm_gib={BUDGET_GIB}",
        f"--json={report_path}",
        f"--dump_hlo={tmp_path / 'hlo'}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(report_path.read_text()), result.stdout, tmp_path


def test_reports_positive_bytes_for_the_tpu_devices(searched):
    report, stdout, tmp_path = searched
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4
    assert report["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
    assert report["parameters"] == _tiny_parameters()
    # Data parallel: every device holds the float32 params and Adafactor's state (less than
    # the params: vectors, or whole matrices below 128 in both dims) and its 2 rows.
    params = 4 * report["parameters"]
    assert params < report["argument_bytes"] < 2 * params + 2**20
    assert report["alias_bytes"] <= report["argument_bytes"]
    for key in ("argument_bytes", "output_bytes", "peak_bytes", "code_bytes", "total_bytes"):
        assert report[key] > 0, key
    buffers = report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
    assert report["total_bytes"] >= buffers + report["temp_bytes"]
    assert report["total_bytes"] == max(buffers + report["temp_bytes"], report["peak_bytes"])
    assert report["fits"] == (report["total_bytes"] <= BUDGET_GIB * 2**30)
    assert "compile-only: no step time" in stdout
    hlo = (tmp_path / "hlo" / "train_step.optimized.hlo.txt").read_text()
    assert "all-reduce" in hlo  # the data-parallel gradient sum


def test_the_largest_batch_fits_and_one_more_step_does_not(searched):
    report, stdout, _ = searched
    budget = int(BUDGET_GIB * 2**30)
    largest = report["largest_batch"]
    compiled = {int(batch): result for batch, result in report["compiled"].items()}
    granule = largest["granule"]
    assert granule == 4  # one more row on each of the 4 data-parallel devices
    best = largest["global_batch"]
    assert largest["verified"] and largest["first_too_large"] == best + granule
    assert compiled[best]["total_bytes"] <= budget < compiled[best + granule]["total_bytes"]
    assert best > 2 * 8  # the search went past the two starting batches
    # Memory grows with the batch over the compiled points.
    totals = [compiled[batch]["total_bytes"] for batch in sorted(compiled)]
    assert totals == sorted(totals) and totals[-1] > totals[0]
    assert f"largest global batch that fits: {best} (verified" in stdout


def test_a_mesh_that_does_not_divide_the_topology_is_refused(tmp_path):
    result = _compile(tmp_path, *RUN, "--gin.train.mesh_shape=(3, 1, 1)", "--topology=v5e:2x2")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.mesh_shape=(3, 1, 1)" in errors[0], result.stderr
    assert "4 devices" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("v4-8", "v4:2x2x1"),
        ("v4-128", "v4:4x4x4"),
        ("v5p-64", "v5p:2x4x4"),
        ("v5e-256", "v5e:16x16"),
        ("v5litepod-16", "v5e:4x4"),
        ("v6e-8", "v6e:2x4"),
        ("v4:4x4x8", "v4:4x4x8"),
    ],
)
def test_accelerator_types_name_their_topology(spec, name):
    assert aot.topology_name(spec) == name
    generation, shape = name.split(":")
    chips = math.prod(int(size) for size in shape.split("x"))
    if ":" not in spec:  # v4 and v5p count TensorCores, two per chip
        cores_per_chip = 2 if generation in ("v4", "v5p") else 1
        assert chips * cores_per_chip == int(spec.split("-")[1])


@pytest.mark.parametrize("spec", ["v4-12", "v5e-3", "tpu-8", "v3-8"])
def test_unknown_slices_are_refused(spec):
    with pytest.raises(ConfigError, match="--topology="):
        aot.topology_name(spec)


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = aot.importlib.util.find_spec
    monkeypatch.setattr(
        aot.importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        aot.tpu_devices("v5e:2x2")


def test_largest_fitting_against_a_known_line():
    # 100 + 7 * units bytes: the largest batch within 1000 bytes is 128 units (996 bytes).
    compiled = []

    def total_bytes(units):
        compiled.append(units)
        return 100 + 7 * units

    found = aot.largest_fitting(total_bytes, 1000, {1: 107, 2: 114})
    assert found == {"units": 128, "verified": True, "first_too_large": 129}
    assert len(compiled) <= 6
    # Nearly flat: grows at most fourfold per compile, still ends adjacent.
    found = aot.largest_fitting(
        lambda units: 10**6 + units, 10**6 + 50, {1: 10**6 + 1, 2: 10**6 + 2}
    )
    assert found["units"] == 50 and found["verified"]


def test_a_step_the_compiler_refuses_is_reported_as_not_fitting(tmp_path):
    """libtpu refuses to compile a step whose temporaries exceed the chip (RESOURCE_EXHAUSTED):
    that is the answer "does not fit", reported with what it needed, not a traceback. The tiny
    step at 65,536 rows per v5e chip needs about 93 GiB of temporaries."""
    report_path = tmp_path / "refused.json"
    result = _compile(
        tmp_path,
        *RUN,
        "--gin.BATCH_SIZE=262144",
        "--topology=v5e:2x2",
        "--no_search",
        f"--json={report_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    report = json.loads(report_path.read_text())
    assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["refused"]
    assert report["available_bytes"] < 16 * 2**30 < report["total_bytes"]
    assert report["total_bytes"] == report["temp_required_bytes"]
    assert "refused by the compiler" in result.stdout and "does not fit" in result.stdout


def test_the_search_counts_a_refused_batch_as_not_fitting(monkeypatch):
    """A refused probe counts as not fitting even where the bytes it needed are within the
    budget (libtpu's limit, e.g. 15.75 G of a 16 GiB chip, is below the chip's HBM), and the
    search halves its way down from it rather than following the line that overshot: here 5
    bytes a row, 1000 bytes of budget (the line's answer, 200), every batch above 100 refused
    at 900 bytes."""
    compiler = object.__new__(aot.TrainStepCompiler)
    compiler._cache, compiler.batch_granule, compiler.progress = {}, 4, None

    def fake_compile(batch_size, keep=False):
        refused = {"refused": "RESOURCE_EXHAUSTED", "total_bytes": 900}
        compiler._cache[batch_size] = (
            refused if batch_size > 100 else {"total_bytes": 5 * batch_size}
        )

    monkeypatch.setattr(compiler, "compile", fake_compile)
    found = compiler.largest_batch(1000, 8)
    assert len(compiler._cache) <= 10
    assert found == {"global_batch": 100, "verified": True, "first_too_large": 104, "granule": 4}
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (16.42G) exceeds available HBM (15.75G)."
    )
    assert aot.refusal(RuntimeError(message)) == {
        "refused": message[:-1],
        "temp_required_bytes": int(16.42 * 2**30),
        "available_bytes": int(15.75 * 2**30),
    }
    assert aot.refusal(RuntimeError("INTERNAL: something else")) is None


def _gathers_of_all_pooled_views(hlo: str, rows: int, segments: int, d_model: int) -> list[str]:
    """The HLO's all-gathers over all 16 devices of a `[2 * rows * segments, d_model]` array:
    both views' pooled embeddings of the whole global batch (E2S2's contrastive negatives)."""
    shape = f"[{2 * rows * segments},{d_model}]"
    return [
        line
        for line in hlo.splitlines()
        if " all-gather(" in line and shape in line.split("=")[1] and "'axis_0'=16" in line
    ]


@pytest.mark.parametrize("per_shard_negatives", [None, 16])
def test_e2s2_negatives_are_gathered_across_hosts(tmp_path, per_shard_negatives):
    # v5e:4x4: 16 chips on 4 hosts, data-parallel; 32 rows, 2 per chip.
    result = _compile(
        tmp_path,
        *RUN,
        "--gin_file=gin/objectives/e2s2.gin",
        "--gin.BATCH_SIZE=32",
        f"--gin.E2S2Objective.per_shard_negatives={per_shard_negatives}",
        "--topology=v5e:4x4",
        "--no_search",
        f"--dump_hlo={tmp_path}",
        f"--json={tmp_path / 'report.json'}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 4 and report["devices"] == 16
    hlo = (tmp_path / "train_step.optimized.hlo.txt").read_text()
    gathers = _gathers_of_all_pooled_views(hlo, 32, 8, TINY["d_model"])  # max_segments_per_row
    # Global negatives: every chip needs every example's embedding, from all 4 hosts; with a
    # group per chip (per_shard_negatives=16) each chip's negatives are its own.
    assert bool(gathers) == (per_shard_negatives is None), gathers


def test_simulated_cpu_devices_shard_the_state_over_fsdp(tmp_path):
    # --topology=cpu:8 (XLA:CPU on 8 simulated devices, the CPU estimate's backend): with
    # fsdp 4 each device holds a quarter of the float32 params and a quarter of Adafactor's
    # second moments (the tiny model's matrices are below 128 in a dim, so unfactored: as large
    # as the params), plus its 2 rows: just over half the params' bytes. Unsharded it would be
    # twice the params.
    result = _compile(
        tmp_path,
        *RUN,
        "--gin.BATCH_SIZE=16",
        "--gin.train.mesh_shape=(-1, 4, 1)",
        "--topology=cpu:8",
        "--no_search",
        f"--json={tmp_path / 'report.json'}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "model": 1}
    params = 4 * _tiny_parameters()
    assert params / 2 < report["argument_bytes"] < 0.55 * params
    buffers = report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
    assert report["total_bytes"] == buffers + report["temp_bytes"] > report["peak_bytes"]
    assert report["hbm_bytes"] is None and "give --hbm_gib" in result.stdout
