"""benchmarks/_common.py: the re-exec that starts a benchmark with glibc malloc set to keep freed
host memory, and its opt-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
with open({starts!r}, "a") as f:
    f.write("start\\n")
from benchmarks._common import host_malloc, retain_freed_host_memory
retain_freed_host_memory()
print(json.dumps({{"host_malloc": host_malloc(), "argv": sys.argv[1:]}}))
"""


def _run(tmp_path, **env_extra):
    starts = tmp_path / "starts.txt"
    script = tmp_path / "bench.py"
    script.write_text(SCRIPT.format(repo=REPO, starts=str(starts)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("E2S2_BENCH_GLIBC_MALLOC_DEFAULTS", None)
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, str(script), "--flag", "value"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), starts.read_text().count("start")


def test_reexecs_once_with_the_retained_malloc_settings_and_keeps_argv(tmp_path):
    from benchmarks._common import RETAINED_HOST_MALLOC

    report, starts = _run(tmp_path)
    assert starts == 2  # the first start re-executed itself once, then ran
    assert report["host_malloc"] == RETAINED_HOST_MALLOC
    assert report["argv"] == ["--flag", "value"]


def test_glibc_defaults_opt_out_does_not_reexec(tmp_path):
    report, starts = _run(tmp_path, E2S2_BENCH_GLIBC_MALLOC_DEFAULTS="1")
    assert starts == 1
    assert report["host_malloc"] == {"E2S2_BENCH_GLIBC_MALLOC_DEFAULTS": "1"}


ACCELERATOR_IMAGE = """
import runpy, sys
# The accelerator image has jax, flax, optax and orbax (gin-config travels as a wheel) but no
# TensorFlow or SeqIO; `--contenders ours` must not need torch or transformers either. Importing
# any of these fails here.
for name in ("tensorflow", "tensorflow_text", "seqio", "torch", "transformers"):
    sys.modules[name] = None
sys.argv = ["train_step.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_train_step_benchmark_runs_ours_without_tensorflow_seqio_or_torch(tmp_path):
    """The GPU command (`--contenders ours --dtype bfloat16`) must not need what the
    accelerator image lacks; here at tiny sizes, one step."""
    script = tmp_path / "accelerator_image.py"
    script.write_text(
        ACCELERATOR_IMAGE.format(script=os.path.join(REPO, "benchmarks", "train_step.py"))
    )
    env = {**os.environ, "E2S2_BENCH_GLIBC_MALLOC_DEFAULTS": "1", "PYTHONPATH": REPO}
    args = ["--model_gin", os.path.join(REPO, "gin/models/t5_1_1_tiny.gin"), "--contenders"]
    args += ["ours", "--dtype", "bfloat16", "--steps", "1", "--rounds", "1", "--batch_size", "2"]
    args += ["--inputs_length", "32", "--targets_length", "8"]
    out = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{") :])
    assert report["activation_dtype"] == "bfloat16"
    assert report["tokens_per_step"] == 2 * (32 + 8)
    assert report["tokens_per_second"]["span_corruption"] > 0
