"""What both studies (e2s2_jax/study.py, e2s2_jax/study_stages.py) run their jobs with: the
trainer in this process with the study's tasks, the progress line, the machine's description,
a run's loss curve, the compilation cache."""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from pathlib import Path

import gin
import jax

from e2s2_jax import main as entry


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_main(argv: list[str]):
    """Runs `python -m e2s2_jax.main ARGV` in this process, with the study's tasks (the Gin file
    that imports `tasks.study` goes first, so the printed command replays from a shell); returns
    the job's result (train: last metrics; eval, probe: metrics)."""
    # Imported here, not at the top: importing tasks.study trains (or finds cached) the study
    # vocabulary and registers the tasks, work a `--render` or `--help` should not do.
    from tasks.study import STUDY_GIN_FILE

    argv = [argv[0], f"--gin_file={STUDY_GIN_FILE}", *argv[1:]]
    print("$ python -m e2s2_jax.main " + shlex.join(argv), flush=True)
    gin.clear_config()
    args, bindings = entry.parse_flags(argv)
    entry.parse_gin(args.mode, args.gin_file, bindings, args.gin_search_paths)
    entry.check_config(args.mode, bindings)  # as the printed command would be checked
    return entry.JOBS[args.mode]()


def generate_ssr_records(
    size, generator_dir: Path | None, records_dir: Path, task: str, spm_path: Path, bindings=()
) -> dict:
    """Fills the spans of `size.ssr_examples` windows of `task` with the generator in
    `generator_dir` (its model: `size.model_gin` plus `bindings`) into `records_dir`, unless it
    holds them already (then `generator_dir` may be None); returns its summary.json."""
    summary_path = records_dir / "summary.json"
    if not summary_path.exists():
        log(f"SSR records: the generator in {generator_dir} fills {size.ssr_examples} windows")
        run_main(
            [
                "ssr-generate",
                f"--gin_file={size.model_gin}",
                "--gin_file=gin/runs/ssr_generate.gin",
                *(f"--gin.{binding}" for binding in bindings),
                f'--gin.GENERATOR_DIR="{generator_dir}"',
                f'--gin.SSR_OUTPUT_DIR="{records_dir}"',
                f'--gin.ssr_generate.mixture_or_task_name="{task}"',
                f'--gin.ssr_generate.vocabulary_model="{spm_path}"',
                f"--gin.ssr_generate.max_examples={size.ssr_examples}",
                f"--gin.ssr_generate.max_words_per_example={size.pretrain_lengths[0] // 2}",
                f"--gin.ssr_generate.max_input_length={size.pretrain_lengths[0]}",
                "--gin.ssr_generate.examples_per_chunk=512",
            ]
        )
    summary = json.loads(summary_path.read_text())
    if not summary.get("kept"):
        raise RuntimeError(
            f"SSR generation kept no records ({summary_path}: dropped {summary.get('dropped')}): "
            "the generator is too weakly trained to emit its sentinels; give it more steps (the "
            f"study size's generator_steps), then delete {records_dir} and run again"
        )
    log(f"SSR records: kept {summary['kept']} of {summary['examples']} windows")
    return summary


def read_curve(path: Path) -> list[list[float]]:
    """[[step, loss], ...] of a run's train_metrics.jsonl (the objective's own loss)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[row["step"], row["loss"]] for row in rows if "loss" in row]


def machine_description() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {device.platform} ({device.device_kind})"
    )


def enable_compilation_cache(out_dir: Path) -> None:
    # Every fine-tune of a size compiles the same programs: cache them across runs.
    jax.config.update("jax_compilation_cache_dir", str(out_dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def check_settings(out_dir: Path, settings: dict) -> None:
    """Records a study's (or a stage's) settings in out_dir/settings.json, or refuses to resume
    runs made with other settings (a finished run is recognised by its step count alone)."""
    path = out_dir / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = sorted(
                k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k)
            )
            raise SystemExit(
                f"error: {out_dir} holds runs made with other study settings (differing: "
                f"{changed}; see {path}): pass another --out, or delete {path} and the "
                "runs made with it to start again"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))
