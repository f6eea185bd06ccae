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
