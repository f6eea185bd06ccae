"""Two processes with `jax.distributed` (CPU collectives over gloo on localhost) against one
process on the same global batch; and the Gin trainer launched as two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import eight_devices
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["XLA_FLAGS"] = eight_devices.xla_flags()
    return env


def _wait_all(processes, timeout=600):
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        outputs.append((process.returncode, out, err))
    for code, out, err in outputs:
        assert code == 0, f"exit {code}\n{out}\n{err[-4000:]}"
    return outputs


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    worker = os.path.join(REPO, "tests", "distributed_worker.py")
    port = _free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                worker,
                "--num_processes=2",
                f"--process_id={i}",
                f"--port={port}",
                f"--out={tmp_path / f'p{i}.json'}",
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    processes.append(
        subprocess.Popen(
            [sys.executable, worker, "--num_processes=1", f"--out={tmp_path / 'single.json'}"],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    _wait_all(processes)
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p0", "p1", "single")]
    assert [r["process_count"] for r in results] == [2, 2, 1]
    single = results[2]
    assert single["losses"][-1] < single["losses"][0]  # it trains
    for result in results[:2]:
        np.testing.assert_allclose(result["losses"], single["losses"], rtol=2e-6)
        np.testing.assert_allclose(result["param_sum"], single["param_sum"], rtol=1e-6)


def test_gin_trainer_runs_as_two_processes(tmp_path):
    port = _free_port()
    model_dir = tmp_path / "run"
    env = _env()
    env["XLA_FLAGS"] = eight_devices.xla_flags(2)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "e2s2_jax.main",
                "train",
                "--gin_file=gin/models/t5_1_1_tiny.gin",
                "--gin_file=gin/runs/pretrain.gin",
                "--gin_file=gin/runs/smoke.gin",
                f'--gin.MODEL_DIR="{model_dir}"',
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                "--gin.BATCH_SIZE=8",
                "--gin.TRAIN_STEPS=3",
                "--gin.train.log_every=1",
                "--gin.optax.warmup_cosine_decay_schedule.warmup_steps=1",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    (_, out0, _), (_, out1, _) = _wait_all(processes)
    assert "mesh {'data': 4, 'fsdp': 1, 'model': 1} over 4 devices" in out0
    assert "2 process(es)" in out0 and "step 1/3" in out0
    assert "step 1/3" not in out1  # only process 0 logs
    losses = [
        json.loads(line)["loss"]
        for line in (model_dir / "train_metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert os.path.isdir(model_dir / "checkpoints" / "3" / "state")
