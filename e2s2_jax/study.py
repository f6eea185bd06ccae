"""The method comparison study: each pretraining objective, a fixed token budget, every
downstream task, several seeds; a table and plots of the outcome.

For each objective (span corruption, E2S2, its denoise-only and contrast-only ablations, SSR with
a generator the study first pretrains at a larger size) and seed: pretrain on the bundled corpus
for the same steps x batch x lengths, fine-tune on each downstream task (tasks/downstream.py),
evaluate on its test split. Span corruption's checkpoints are also fine-tuned with SurfaceFusion
added ("span_corruption+surface_fusion"). Writes, under --out:

  results.json             every run's metrics, the pretraining curves, the settings, timings
  results.md               mean +- std per objective and task, and the difference from span
                           corruption with whether it is outside the noise (2 standard errors)
  pretraining_curves.png   each objective's pretraining loss against step (mean over seeds)
  tasks.png                per-task bars with error bars (std over seeds)
  runs/                    the checkpoints and logs of every run (a rerun skips finished runs)

The statistics, table, figures and README section are e2s2_jax/study_report.py's.

  python -m e2s2_jax.study --quick            # tiny model; about an hour on 2 CPU cores
  python -m e2s2_jax.study --size small       # T5 1.1 small, for a GPU

The vocabulary is a SentencePiece model of the demo size trained on the pretraining corpus and
the downstream train splits (the Austen-only demo vocabulary has no Spanish accents).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from e2s2_jax.stage_report import update_readme as update_stage_readme  # noqa: E402
from e2s2_jax.study_common import (  # noqa: E402
    check_settings,
    enable_compilation_cache,
    generate_ssr_records,
    log,
    machine_description,
    read_curve,
    run_main,
)
from e2s2_jax.study_report import (  # noqa: E402
    BASELINE,
    HEADLINE,
    summarize,
    update_readme,
    write_outputs,
)
from e2s2_jax.study_sizes import SIZES as STAGE_SIZES  # noqa: E402
from e2s2_jax.study_sizes import STAGES  # noqa: E402
from e2s2_jax.study_stages import run_stage  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StudySize:
    """One size of the study: the models, the budgets and the evaluation."""

    model_gin: str
    generator_bindings: tuple[str, ...]  # the SSR generator: the model file made larger
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lengths: tuple[int, int]
    pretrain_peak_lr: float
    generator_steps: int
    ssr_examples: int
    finetune_steps: int
    finetune_batch: int
    finetune_lengths: tuple[int, int]
    finetune_lr: float
    test_examples: int
    decode_length: int


SIZES = {
    "quick": StudySize(
        model_gin="gin/models/t5_1_1_tiny.gin",
        generator_bindings=(
            "T5Config.d_model=128",
            "T5Config.d_ff=256",
            "T5Config.d_kv=32",
            "T5Config.num_encoder_layers=3",
            "T5Config.num_decoder_layers=3",
        ),
        pretrain_steps=100,
        pretrain_batch=32,
        pretrain_lengths=(128, 32),
        pretrain_peak_lr=0.01,
        generator_steps=200,
        ssr_examples=1024,
        finetune_steps=50,
        finetune_batch=16,
        finetune_lengths=(128, 64),
        finetune_lr=3e-3,
        test_examples=64,
        decode_length=64,
    ),
    # For tests of the pipeline: a few steps of everything (the numbers mean nothing).
    "smoke": StudySize(
        model_gin="gin/models/t5_1_1_tiny.gin",
        generator_bindings=("T5Config.d_model=96", "T5Config.num_encoder_layers=3"),
        pretrain_steps=4,
        pretrain_batch=8,
        pretrain_lengths=(64, 16),
        pretrain_peak_lr=0.01,
        generator_steps=4,
        ssr_examples=64,
        finetune_steps=3,
        finetune_batch=8,
        finetune_lengths=(64, 32),
        finetune_lr=3e-3,
        test_examples=8,
        decode_length=8,
    ),
    "small": StudySize(
        model_gin="gin/models/t5_1_1_small.gin",
        generator_bindings=(
            "T5Config.d_model=768",
            "T5Config.d_ff=2048",
            "T5Config.num_heads=12",
            "T5Config.num_encoder_layers=12",
            "T5Config.num_decoder_layers=12",
        ),
        pretrain_steps=20000,
        pretrain_batch=128,
        pretrain_lengths=(512, 114),
        pretrain_peak_lr=0.01,
        generator_steps=40000,
        ssr_examples=500_000,
        finetune_steps=4000,
        finetune_batch=64,
        finetune_lengths=(256, 128),
        finetune_lr=1e-3,
        test_examples=2000,
        decode_length=128,
    ),
}


@dataclasses.dataclass(frozen=True)
class Objective:
    """A pretraining objective: the task kind it reads and the Gin files that set it up."""

    task_objective: str  # preprocessors objective of its pretraining task, or "ssr"
    gin_files: tuple[str, ...] = ()


OBJECTIVES = {
    "span_corruption": Objective("span_corruption"),
    "e2s2": Objective("e2s2", ("gin/objectives/e2s2.gin",)),
    "e2s2_denoise_only": Objective("e2s2", ("gin/objectives/e2s2_denoise_only.gin",)),
    "e2s2_contrast_only": Objective("e2s2", ("gin/objectives/e2s2_contrast_only.gin",)),
    "ssr": Objective("ssr", ("gin/objectives/ssr.gin",)),
}
# Fine-tuning variants: (pretrained objective, extra fine-tuning Gin files).
VARIANTS = {name: (name, ()) for name in OBJECTIVES} | {
    "span_corruption+surface_fusion": (BASELINE, ("gin/models/surface_fusion_finetune.gin",)),
}


def _lengths(lengths: tuple[int, int]) -> str:
    return f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {lengths[0]}, 'targets': {lengths[1]}}}"


def _finished(model_dir: Path, steps: int) -> bool:
    return (model_dir / "checkpoints" / str(steps)).is_dir()


# ----------------------------------------------------------------------------- stages


class Study:
    def __init__(
        self,
        size: StudySize,
        out_dir: Path,
        seeds: Sequence[int],
        tasks: Sequence[str],
        objectives: Sequence[str] = tuple(OBJECTIVES),
    ):
        self.size = size
        self.out_dir = out_dir
        self.runs = out_dir / "runs"
        self.seeds = list(seeds)
        self.tasks = list(tasks)
        self.objectives = list(objectives)
        # A fine-tuning variant runs when the objective it starts from is in the study.
        self.variants = [v for v, (o, _) in VARIANTS.items() if o in self.objectives]
        self.started = time.time()
        import tasks.study  # registers the study's tasks with its vocabulary

        self.vocabulary, self.spm_path = (
            tasks.study.STUDY_VOCABULARY,
            tasks.study.STUDY_VOCABULARY_PATH,
        )
        self.pretrain_tasks = tasks.study.STUDY_PRETRAIN_TASKS
        self.stage_seconds: dict[str, float] = {}

    def _pretrain_argv(self, model_dir: Path, task: str, steps: int, seed: int, extra=()):
        size = self.size
        return [
            "train",
            f"--gin_file={size.model_gin}",
            "--gin_file=gin/runs/pretrain.gin",
            "--gin_file=gin/runs/adamw.gin",
            *extra,
            f'--gin.MODEL_DIR="{model_dir}"',
            f'--gin.MIXTURE_OR_TASK_NAME="{task}"',
            _lengths(size.pretrain_lengths),
            f"--gin.TRAIN_STEPS={steps}",
            f"--gin.BATCH_SIZE={size.pretrain_batch}",
            f"--gin.optax.warmup_cosine_decay_schedule.peak_value={size.pretrain_peak_lr}",
            f"--gin.optax.warmup_cosine_decay_schedule.warmup_steps={max(1, steps // 8)}",
            f"--gin.train.seed={seed}",
            f"--gin.train.data_seed={seed}",
            f"--gin.train.log_every={max(1, steps // 15)}",
            f"--gin.train.checkpoint_every={steps}",
            "--gin.train.keep_checkpoints=1",
            "--gin.train.eval_every=0",
        ]

    def ssr_records(self) -> Path:
        """Pretrains the larger generator with span corruption, then fills spans with it."""
        size = self.size
        generator_dir = self.runs / "ssr_generator"
        records_dir = self.runs / "ssr_records"
        if not _finished(generator_dir, size.generator_steps):
            log(f"SSR generator: pretraining {size.generator_steps} steps at the larger size")
            run_main(
                self._pretrain_argv(
                    generator_dir,
                    self.pretrain_tasks["span_corruption"],
                    size.generator_steps,
                    seed=0,
                )
                + [f"--gin.{binding}" for binding in size.generator_bindings]
            )
        generate_ssr_records(
            size,
            generator_dir,
            records_dir,
            self.pretrain_tasks["span_corruption"],
            self.spm_path,
            size.generator_bindings,
        )
        return records_dir

    def pretrain(self, objective: str, seed: int) -> Path:
        spec = OBJECTIVES[objective]
        model_dir = self.runs / "pretrain" / objective / f"seed{seed}"
        if _finished(model_dir, self.size.pretrain_steps):
            return model_dir
        extra = list(f"--gin_file={name}" for name in spec.gin_files)
        if spec.task_objective == "ssr":
            records = self.ssr_records()
            task = "unused"
            extra += [
                f'--gin.SSR_RECORDS_DIR="{records}"',
                f'--gin.ssr_mixture_or_task.vocabulary_model="{self.spm_path}"',
            ]
        else:
            task = self.pretrain_tasks[spec.task_objective]
        argv = self._pretrain_argv(model_dir, task, self.size.pretrain_steps, seed, extra)
        if spec.task_objective == "ssr":  # ssr.gin binds the task itself
            argv = [a for a in argv if not a.startswith("--gin.MIXTURE_OR_TASK_NAME=")]
        run_main(argv)
        return model_dir

    def finetune_and_test(self, variant: str, seed: int, dataset: str, pretrained: Path) -> dict:
        from tasks.downstream import DOWNSTREAM_TASKS

        size = self.size
        _, gin_files = VARIANTS[variant]
        model_dir = self.runs / "finetune" / variant / f"seed{seed}" / dataset
        result_path = model_dir / "test_metrics.json"
        if result_path.exists():
            return json.loads(result_path.read_text())
        task = DOWNSTREAM_TASKS[dataset]
        model_files = [f"--gin_file={size.model_gin}", *(f"--gin_file={g}" for g in gin_files)]
        common = [
            f'--gin.MODEL_DIR="{model_dir}"',
            f'--gin.MIXTURE_OR_TASK_NAME="{task}"',
            _lengths(size.finetune_lengths),
        ]
        if not _finished(model_dir, size.finetune_steps):
            run_main(
                [
                    "train",
                    model_files[0],
                    "--gin_file=gin/runs/finetune.gin",
                    *model_files[1:],
                    *common,
                    f'--gin.INITIAL_CHECKPOINT="{pretrained}"',
                    f"--gin.TRAIN_STEPS={size.finetune_steps}",
                    f"--gin.BATCH_SIZE={size.finetune_batch}",
                    f"--gin.optax.constant_schedule.value={size.finetune_lr}",
                    f"--gin.train.seed={seed}",
                    f"--gin.train.data_seed={seed}",
                    f"--gin.train.log_every={max(1, size.finetune_steps // 3)}",
                    f"--gin.train.checkpoint_every={size.finetune_steps}",
                    "--gin.train.keep_checkpoints=1",
                    "--gin.train.eval_every=0",
                ]
            )
        metrics = run_main(
            [
                "eval",
                model_files[0],
                "--gin_file=gin/runs/eval.gin",
                *model_files[1:],
                *common,
                '--gin.evaluate.split="test"',
                "--gin.evaluate.eval_batches=2",
                f"--gin.evaluate.max_decode_examples={size.test_examples}",
                f"--gin.DecodeConfig.max_decode_length={size.decode_length}",
            ]
        )
        result_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        return metrics

    def run(self) -> dict:
        pretrained: dict[tuple[str, int], Path] = {}
        finetuned: dict[str, dict[str, dict[str, dict]]] = {}
        jobs = [(o, s) for o in self.objectives for s in self.seeds]
        for i, (objective, seed) in enumerate(jobs, start=1):
            log(f"pretrain {i}/{len(jobs)}: {objective}, seed {seed} ({self._elapsed()})")
            start = time.time()
            pretrained[objective, seed] = self.pretrain(objective, seed)
            self._add_time(f"pretrain/{objective}", start)
        jobs = [(v, s, t) for v in self.variants for s in self.seeds for t in self.tasks]
        for i, (variant, seed, dataset) in enumerate(jobs, start=1):
            log(f"fine-tune {i}/{len(jobs)}: {variant}, seed {seed}, {dataset} ({self._elapsed()})")
            start = time.time()
            checkpoint = pretrained[VARIANTS[variant][0], seed]
            metrics = self.finetune_and_test(variant, seed, dataset, checkpoint)
            finetuned.setdefault(variant, {}).setdefault(dataset, {})[str(seed)] = metrics
            self._add_time(f"finetune/{variant}", start)
        return self.results(pretrained, finetuned)

    def _elapsed(self) -> str:
        return f"{(time.time() - self.started) / 60:.1f} min so far"

    def _add_time(self, key: str, start: float) -> None:
        self.stage_seconds[key] = self.stage_seconds.get(key, 0.0) + time.time() - start

    def results(self, pretrained, finetuned) -> dict:
        curves = {}
        for (objective, seed), model_dir in pretrained.items():
            curves.setdefault(objective, {})[str(seed)] = read_curve(
                model_dir / "train_metrics.jsonl"
            )
        return {
            "size": dataclasses.asdict(self.size),
            "seeds": self.seeds,
            "objectives": self.objectives,
            "variants": self.variants,
            "tasks": self.tasks,
            "headline_metrics": {t: HEADLINE[t] for t in self.tasks},
            "vocabulary": self.spm_path,
            "machine": machine_description(),
            "date": time.strftime("%Y-%m-%d"),
            "elapsed_s": round(time.time() - self.started, 1),
            "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
            "pretraining_curves": curves,
            "finetune": finetuned,
            "summary": summarize(finetuned, self.tasks),
        }


def main(argv: Sequence[str] | None = None) -> int:
    from tasks.downstream import DOWNSTREAM_SPECS

    parser = argparse.ArgumentParser(
        prog="python -m e2s2_jax.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--size", choices=sorted(SIZES.keys() | STAGE_SIZES.keys()), default=None)
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default=None,
        help="run one stage of the staged study (sizes smoke, medium, small) into OUT/SIZE/",
    )
    parser.add_argument("--out", default="study", help="output directory (default: study/)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--tasks", default=",".join(DOWNSTREAM_SPECS), help="comma-separated downstream datasets"
    )
    parser.add_argument(
        "--objectives", default=",".join(OBJECTIVES), help="comma-separated pretraining objectives"
    )
    parser.add_argument(
        "--readme", default=None, help="also write the results into this README's markers"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="no runs: redraw the table, plots (and --readme) from --out's results.json",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out).resolve()
    if args.stage is not None:
        return _main_stage(parser, args, out_dir)
    if args.render:
        if not (out_dir / "results.json").is_file():
            parser.error(
                f"--render: {out_dir / 'results.json'} does not exist; run the study first"
            )
        results = json.loads((out_dir / "results.json").read_text())
        write_outputs(results, out_dir)
        if args.readme:
            update_readme(results, out_dir, Path(args.readme).resolve())
        return 0
    if args.size not in (None, *SIZES):
        parser.error(f"--size {args.size} is a size of the staged study: give --stage too")
    if args.quick and args.size not in (None, "quick"):
        parser.error("--quick is --size quick; give one of them")
    size_name = "quick" if args.quick or args.size is None else args.size
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(HEADLINE))
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {sorted(HEADLINE)}")
    objectives = [o for o in args.objectives.split(",") if o]
    unknown = sorted(set(objectives) - set(OBJECTIVES))
    if unknown or not objectives:
        parser.error(f"--objectives: unknown {unknown}; choose from {sorted(OBJECTIVES)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"size": size_name, **json.loads(json.dumps(dataclasses.asdict(SIZES[size_name])))}
    check_settings(out_dir, settings)
    enable_compilation_cache(out_dir)
    log(f"size {size_name}, {args.seeds} seeds, tasks {tasks}, output {out_dir}")
    study = Study(SIZES[size_name], out_dir, range(args.seeds), tasks, objectives)
    results = study.run()
    results["size_name"] = size_name
    write_outputs(results, out_dir)
    if args.readme:
        update_readme(results, out_dir, Path(args.readme).resolve())
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {out_dir}/results.md\n")
    print((out_dir / "results.md").read_text())
    return 0


def _main_stage(parser: argparse.ArgumentParser, args, out_dir: Path) -> int:
    """--stage: one stage of the staged study (e2s2_jax/study_stages.py)."""
    if args.quick or args.size not in STAGE_SIZES:
        parser.error(f"--stage needs --size, one of {sorted(STAGE_SIZES)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(HEADLINE))
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {sorted(HEADLINE)}")
    root = out_dir / args.size
    if not args.render:
        root.mkdir(parents=True, exist_ok=True)
        enable_compilation_cache(root)
        log(f"stage {args.stage}, size {args.size}, {args.seeds} seeds, output {root}")
        results = run_stage(args.stage, args.size, root, range(args.seeds), tasks)
        log(f"stage {args.stage} {results['status']}: {root / args.stage}/results.md\n")
        print((root / args.stage / "results.md").read_text())
    if args.readme:
        update_stage_readme(root, STAGES, Path(args.readme).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
