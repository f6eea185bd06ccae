"""Runs a test file's worker function in a subprocess that sees 8 simulated CPU devices; and
`xla_flags`, the `XLA_FLAGS` every test subprocess gets (the suite's own, with a device count).

XLA reads `--xla_force_host_platform_device_count` once per process, so setting it inside
pytest would depend on test order and give every other test module 8 devices too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(device_count: int | None = None) -> str:
    """This process's `XLA_FLAGS` (the suite's compile settings, see conftest.py) for a
    subprocess: any host device count removed, then `device_count` devices if given."""
    flags = [
        f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)
    ]
    if device_count is not None:
        flags.append(f"{DEVICE_COUNT_FLAG}={device_count}")
    return " ".join(flags)


def run_worker(test_file: str, worker: str) -> dict:
    """Runs `python test_file worker` on 8 CPU devices; returns the JSON its last line prints."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(8)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.abspath(test_file), worker],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(f"8-device worker failed:\n{result.stdout}\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
