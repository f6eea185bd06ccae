"""The study in stages: each method in the regime its paper used, at a size this machine runs.

  python -m e2s2_jax.study --size medium --stage sensitivity      # then surface_fusion, e2s2, ssr
  python -m e2s2_jax.study --size medium --stage sensitivity --readme README.md

Each stage runs alone, resumes where it stopped (a finished run is skipped, a run cut short
restarts from its newest checkpoint), and writes study/<size>/<stage>/{results.json,
results.md, *.png} when it ends; every finished run also rewrites results.json (status
"partial") so that a stage cut short still reports what it has.

- sensitivity: random initialisation against span-corruption pretraining, the same fine-tuning
  budget, every downstream task. The gate for the rest: pretraining must beat random
  initialisation by more than 2 standard errors (paired by seed) on at least 3 of the 5 tasks.
- surface_fusion: translation from scratch on kjv_to_sparv and kjv_to_web (tied embeddings,
  dropout 0.1, label smoothing 0.1, 4-beam BLEU on the whole test split): plain, hard
  SurfaceFusion at lam 0.8 with the reference's loss, and EncoderFusion's layer attention.
- e2s2: the sensitivity stage's span-corruption checkpoint of each seed, continued for the same
  budget with span corruption, E2S2 at the reference weights, and E2S2 at stronger encoder
  weights; then a frozen-encoder linear probe on wiki_topic (e2s2_jax.probe) and fine-tuning
  on spelling_grammar and wiki_topic.
- ssr: a generator larger than the student (and one of the student's size) fills spans; the
  student continues from its span-corruption checkpoint on a 50/50 SSR / span-corruption mix,
  against span corruption alone; fine-tuned on kjv_to_web and spelling_grammar.

Every comparison is paired: the same seed gives both arms the same initialisation, data order
and fine-tuning; study_report.paired_differences gives the mean difference, its standard error
and the verdict against the paper's direction.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from e2s2_jax.stage_report import (
    HEADLINES,
    paired_differences,
    sensitivity_verdict,
    write_stage_outputs,
)
from e2s2_jax.study_common import (
    check_settings,
    generate_ssr_records,
    log,
    machine_description,
    read_curve,
    run_main,
)
from e2s2_jax.study_sizes import SIZES, STAGE_FIELDS, StageSize

# surface_fusion: {arm: model Gin files}, trained from scratch with the reference's recipe.
TRANSLATION_TASKS = ("kjv_to_sparv", "kjv_to_web")
SURFACE_FUSION_ARMS = {
    "translation_plain": (),
    "translation_surface_fusion_hard": ("gin/models/surface_fusion.gin",),
    "translation_encoder_fusion_layer_attention": (
        "gin/models/encoder_fusion_layer_attention.gin",
    ),
}
TRANSLATION_BINDINGS = (
    "T5Config.tie_word_embeddings=True",
    "T5Config.scale_decoder_outputs=True",
    "T5Config.dropout_rate=0.1",
    "Seq2SeqObjective.label_smoothing=0.1",
)
SURFACE_FUSION_COMPARISONS = [
    ("translation_surface_fusion_hard", "translation_plain"),
    ("translation_encoder_fusion_layer_attention", "translation_plain"),
]

# e2s2: {arm: (pretraining task kind, Gin arguments)}, each continuing span corruption. A kind
# of None leaves the task to the Gin file (RTS, C-RTS, SLM: `encoder_view_task` over the bundled
# corpus, here with the study's vocabulary); `{vocabulary}` and `{clusters}` in an argument are
# the study's SentencePiece model and the seed's C-RTS table (k-means over its warm start's
# input embeddings, `e2s2_jax.token_clusters`).
_STUDY_VOCABULARY_ARG = '--gin.encoder_view_task.vocabulary_model="{vocabulary}"'
E2S2_ARMS = {
    "continued_span_corruption": ("span_corruption", ()),
    "continued_e2s2": ("e2s2", ("--gin_file=gin/objectives/e2s2.gin",)),
    # The weights tests/test_e2s2_training.py and the README use to move the heads quickly.
    "continued_e2s2_strong": (
        "e2s2",
        (
            "--gin_file=gin/objectives/e2s2.gin",
            "--gin.E2S2Objective.denoise_weight=1.0",
            "--gin.E2S2Objective.contrast_weight=0.5",
        ),
    ),
    # Related work (METHODS.md section 4) at the same budget, their Gin files' weights (1.0).
    "continued_rts": (None, ("--gin_file=gin/objectives/rts.gin", _STUDY_VOCABULARY_ARG)),
    "continued_c_rts": (
        None,
        (
            "--gin_file=gin/objectives/c_rts.gin",
            _STUDY_VOCABULARY_ARG,
            '--gin.CLUSTER_FILE="{clusters}"',
        ),
    ),
    "continued_slm": (None, ("--gin_file=gin/objectives/slm.gin", _STUDY_VOCABULARY_ARG)),
}
# Clusters of C-RTS's table in the study (its vocabulary has about 8000 regular ids).
C_RTS_CLUSTERS = 256
PROBE = "probe_wiki_topic"  # the frozen-encoder linear probe, reported like a task
E2S2_TASKS = ("spelling_grammar", "wiki_topic")
E2S2_COMPARISONS = [
    ("continued_e2s2", "continued_span_corruption"),
    ("continued_e2s2_strong", "continued_span_corruption"),
    ("continued_rts", "continued_span_corruption"),
    ("continued_c_rts", "continued_span_corruption"),
    ("continued_slm", "continued_span_corruption"),
]

# ssr: the student continues on SSR records mixed 50/50 with span corruption, filled by a
# generator larger than it or by one of its own size, against span corruption alone.
SSR_ARMS = ("continued_span_corruption", "continued_ssr_large", "continued_ssr_student")
SSR_TASKS = ("kjv_to_web", "spelling_grammar")
SSR_COMPARISONS = [
    ("continued_ssr_large", "continued_span_corruption"),
    ("continued_ssr_student", "continued_span_corruption"),
]


def stage_tasks(own: Sequence[str], chosen: Sequence[str]) -> list[str]:
    """The stage's own tasks that --tasks names (all of them by default), in the stage's order."""
    tasks = [t for t in own if t in chosen]
    if not tasks:
        raise SystemExit(f"error: --tasks names none of this stage's tasks {list(own)}")
    return tasks


def _lengths(lengths: Sequence[int]) -> str:
    return f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {lengths[0]}, 'targets': {lengths[1]}}}"


def _finished(model_dir: Path, steps: int) -> bool:
    return (model_dir / "checkpoints" / str(steps)).is_dir()


def _timed(path: Path, work: Callable[[], object]) -> float:
    """Runs `work` and adds its seconds to path (a JSON number), so a run's time survives
    the session that ran it; returns the total."""
    start = time.time()
    work()
    total = (json.loads(path.read_text()) if path.exists() else 0.0) + time.time() - start
    path.write_text(json.dumps(round(total, 1)))
    return total


def stage_settings(stage: str, size_name: str, size: StageSize) -> dict:
    prefixes = STAGE_FIELDS[stage]
    fields = {
        k: v for k, v in dataclasses.asdict(size).items() if any(k.startswith(p) for p in prefixes)
    }
    return {"size": size_name, "stage": stage, **json.loads(json.dumps(fields))}


class StageRunner:
    """The runs a stage is made of. Under `root` (study/<size>/): runs/ holds every run's
    model directory, shared between stages (the e2s2 and ssr stages continue from the
    sensitivity stage's span-corruption checkpoints); <stage>/ holds the stage's results."""

    def __init__(self, size_name: str, root: Path, seeds: Sequence[int]):
        import tasks.study  # registers the study's tasks with its vocabulary

        self.size_name = size_name
        self.size = SIZES[size_name]
        self.root = root
        self.runs = root / "runs"
        self.seeds = list(seeds)
        self.spm_path = tasks.study.STUDY_VOCABULARY_PATH
        self.pretrain_tasks = tasks.study.STUDY_PRETRAIN_TASKS
        self.started = time.time()
        self.used: set[Path] = set()  # the run directories this stage has used

    # ------------------------------------------------------------------ the runs

    def pretrain(
        self,
        name: str,
        seed: int,
        task: str | None,
        extra: Sequence[str] = (),
        initial: Path | None = None,
        model_bindings: Sequence[str] = (),
        steps: int | None = None,
    ) -> Path:
        """Pretrains (or continues from `initial`) into runs/pretrain/<name>/seed<seed>."""
        size = self.size
        steps = steps or size.pretrain_steps
        model_dir = self.runs / "pretrain" / name / f"seed{seed}"
        self.used.add(model_dir)
        if _finished(model_dir, steps):
            return model_dir
        log(f"pretrain {name}, seed {seed}: {steps} steps ({self.elapsed()})")
        argv = [
            "train",
            f"--gin_file={size.model_gin}",
            "--gin_file=gin/runs/pretrain.gin",
            "--gin_file=gin/runs/adamw.gin",
            *extra,
            *(f"--gin.{b}" for b in model_bindings),
            f'--gin.MODEL_DIR="{model_dir}"',
            *([f'--gin.MIXTURE_OR_TASK_NAME="{task}"'] if task else []),
            _lengths(size.pretrain_lengths),
            f"--gin.TRAIN_STEPS={steps}",
            f"--gin.BATCH_SIZE={size.pretrain_batch}",
            f"--gin.optax.warmup_cosine_decay_schedule.peak_value={size.pretrain_peak_lr}",
            f"--gin.optax.warmup_cosine_decay_schedule.warmup_steps={max(1, steps // 8)}",
            f"--gin.train.seed={seed}",
            f"--gin.train.data_seed={seed}",
            f"--gin.train.log_every={max(1, steps // 20)}",
            f"--gin.train.checkpoint_every={max(1, steps // 4)}",
            "--gin.train.keep_checkpoints=1",
            "--gin.train.eval_every=0",
        ]
        if initial is not None:
            argv.append(f'--gin.train.initial_checkpoint="{initial}"')
        model_dir.mkdir(parents=True, exist_ok=True)
        _timed(model_dir / "seconds.json", lambda: run_main(argv))
        return model_dir

    def finetune(
        self,
        arm: str,
        seed: int,
        dataset: str,
        initial: Path | None,
        model_files: Sequence[str] = (),
        bindings: Sequence[str] = (),
        translation: bool = False,
        beam: bool = False,
    ) -> dict:
        """Fine-tunes `initial` (None: a random initialisation) on `dataset`, then evaluates
        on the whole test split; runs/<stage arm>/seed<seed>/<dataset>/test_metrics.json."""
        from tasks.downstream import DOWNSTREAM_TASKS

        size = self.size
        model_dir = self.runs / "finetune" / arm / f"seed{seed}" / dataset
        self.used.add(model_dir)
        result_path = model_dir / "test_metrics.json"
        if result_path.exists():
            return json.loads(result_path.read_text())
        log(f"fine-tune {arm}, seed {seed}, {dataset} ({self.elapsed()})")
        # Both from scratch (translation) and from a checkpoint: RMS-scaled AdamW (the
        # pretraining optimizer), 10% linear warm-up, cosine decay to zero. (The first medium
        # sensitivity try fine-tuned with t5x's constant Adafactor 1e-3 for 300 steps: every
        # decoded output was still degenerate, pretrained or not; study/medium/
        # sensitivity_first_try.)
        if translation:
            steps, batch, lengths = (
                size.translation_steps,
                size.translation_batch,
                size.translation_lengths,
            )
            peak = size.translation_peak_lr
        else:
            steps, batch, lengths = size.finetune_steps, size.finetune_batch, size.finetune_lengths
            peak = size.finetune_lr
        schedule = [
            "--gin_file=gin/runs/adamw.gin",
            f"--gin.optax.warmup_cosine_decay_schedule.peak_value={peak}",
            f"--gin.optax.warmup_cosine_decay_schedule.warmup_steps={max(1, steps // 10)}",
        ]
        files = [f"--gin_file={size.model_gin}", *(f"--gin_file={g}" for g in model_files)]
        common = [
            *(f"--gin.{b}" for b in bindings),
            f'--gin.MODEL_DIR="{model_dir}"',
            f'--gin.MIXTURE_OR_TASK_NAME="{DOWNSTREAM_TASKS[dataset]}"',
            _lengths(lengths),
        ]
        initial_arg = f'"{initial}"' if initial is not None else "None"

        def train():
            run_main(
                [
                    "train",
                    files[0],
                    "--gin_file=gin/runs/finetune.gin",
                    *[a for a in schedule if a.startswith("--gin_file")],
                    *files[1:],
                    *common,
                    f"--gin.INITIAL_CHECKPOINT={initial_arg}",
                    f"--gin.TRAIN_STEPS={steps}",
                    f"--gin.BATCH_SIZE={batch}",
                    *[a for a in schedule if not a.startswith("--gin_file")],
                    f"--gin.train.seed={seed}",
                    f"--gin.train.data_seed={seed}",
                    f"--gin.train.log_every={max(1, steps // 10)}",
                    f"--gin.train.checkpoint_every={steps}",
                    "--gin.train.keep_checkpoints=1",
                    "--gin.train.eval_every=0",
                ]
            )

        model_dir.mkdir(parents=True, exist_ok=True)
        if not _finished(model_dir, steps):
            _timed(model_dir / "seconds.json", train)
        decode = ['--gin.DecodeConfig.method="beam"', "--gin.DecodeConfig.num_beams=4"]
        metrics: dict = {}

        def evaluate():
            metrics.update(
                run_main(
                    [
                        "eval",
                        files[0],
                        "--gin_file=gin/runs/eval.gin",
                        *files[1:],
                        *common,
                        '--gin.evaluate.split="test"',
                        f"--gin.evaluate.batch_size={size.decode_batch}",
                        "--gin.evaluate.eval_batches=2",
                        f"--gin.evaluate.max_decode_examples={size.decode_examples}",
                        f"--gin.DecodeConfig.max_decode_length={lengths[1]}",
                        *(decode if beam else []),
                    ]
                )
            )

        _timed(model_dir / "seconds.json", evaluate)
        result_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        return metrics

    def elapsed(self) -> str:
        return f"{(time.time() - self.started) / 60:.1f} min in this session"

    # ------------------------------------------------------------------ the stages

    def span_corruption(self, seed: int) -> Path:
        return self.pretrain("span_corruption", seed, self.pretrain_tasks["span_corruption"])

    def sensitivity(self, tasks: Sequence[str]) -> dict:
        pretrained = {seed: self.span_corruption(seed) for seed in self.seeds}
        runs: dict = {}
        for seed in self.seeds:
            for dataset in tasks:
                for arm, initial in (("random_init", None), ("span_corruption", pretrained[seed])):
                    metrics = self.finetune(arm, seed, dataset, initial)
                    runs.setdefault(arm, {}).setdefault(dataset, {})[str(seed)] = metrics
                    self.write(
                        "sensitivity", tasks, runs, [("span_corruption", "random_init")], False
                    )
        return self.write("sensitivity", tasks, runs, [("span_corruption", "random_init")], True)

    def surface_fusion(self, tasks: Sequence[str]) -> dict:
        tasks = stage_tasks(TRANSLATION_TASKS, tasks)
        runs: dict = {}
        for seed in self.seeds:
            for dataset in tasks:
                for arm, model_files in SURFACE_FUSION_ARMS.items():
                    metrics = self.finetune(
                        arm,
                        seed,
                        dataset,
                        None,
                        model_files,
                        TRANSLATION_BINDINGS,
                        translation=True,
                        beam=True,
                    )
                    runs.setdefault(arm, {}).setdefault(dataset, {})[str(seed)] = metrics
                    self.write("surface_fusion", tasks, runs, SURFACE_FUSION_COMPARISONS, False)
        return self.write("surface_fusion", tasks, runs, SURFACE_FUSION_COMPARISONS, True)

    def continued(self, name: str, seed: int, task: str, extra: Sequence[str] = ()) -> Path:
        """The seed's span-corruption checkpoint continued for continue_steps."""
        return self.pretrain(
            name,
            seed,
            task,
            extra,
            initial=self.span_corruption(seed),
            steps=self.size.continue_steps,
        )

    def e2s2(self, tasks: Sequence[str]) -> dict:
        tasks = stage_tasks(E2S2_TASKS, tasks)
        runs: dict = {}
        for seed in self.seeds:
            # The warm start's own probe: what the continuations start from.
            warm_start = self.probe(self.span_corruption(seed))
            runs.setdefault("warm_start", {}).setdefault(PROBE, {})[str(seed)] = warm_start
            for arm, (task_kind, extra) in E2S2_ARMS.items():
                task = self.pretrain_tasks[task_kind] if task_kind else None
                extra = [self.fill_arm_argument(arg, seed) for arg in extra]
                checkpoint = self.continued(arm, seed, task, extra)
                runs.setdefault(arm, {}).setdefault(PROBE, {})[str(seed)] = self.probe(checkpoint)
                for dataset in tasks:
                    metrics = self.finetune(arm, seed, dataset, checkpoint)
                    runs[arm].setdefault(dataset, {})[str(seed)] = metrics
                self.write("e2s2", (PROBE, *tasks), runs, E2S2_COMPARISONS, False, E2S2_ARMS)
        return self.write("e2s2", (PROBE, *tasks), runs, E2S2_COMPARISONS, True, E2S2_ARMS)

    def fill_arm_argument(self, argument: str, seed: int) -> str:
        """`argument` with `{vocabulary}` (the study's SentencePiece model) and `{clusters}`
        (the seed's C-RTS table, built on first use) filled in."""
        if "{clusters}" in argument:
            argument = argument.replace("{clusters}", str(self.c_rts_clusters(seed)))
        return argument.replace("{vocabulary}", str(self.spm_path))

    def c_rts_clusters(self, seed: int) -> Path:
        """C-RTS's token -> cluster table from the seed's warm start (its input embeddings,
        k-means with the seed), written once to runs/c_rts_clusters/seed<seed>.npy."""
        from e2s2_jax import token_clusters

        path = self.runs / "c_rts_clusters" / f"seed{seed}.npy"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                f"--params_dir={self.span_corruption(seed)}",
                f"--output={path}",
                f"--num_clusters={C_RTS_CLUSTERS}",
                f"--seed={seed}",
                f"--vocabulary_model={self.spm_path}",
            ]
            print("$ python -m e2s2_jax.main clusters " + " ".join(argv), flush=True)
            if token_clusters.main(argv) != 0:
                raise RuntimeError(f"building the C-RTS cluster table {path} failed")
        return path

    def probe(self, model_dir: Path) -> dict:
        """The frozen encoder's linear probe on wiki_topic (e2s2_jax/probe.py)."""
        path = model_dir / "probe_metrics.json"
        if path.exists():
            return json.loads(path.read_text())
        log(f"probe {model_dir} ({self.elapsed()})")
        return run_main(
            [
                "probe",
                f"--gin_file={self.size.model_gin}",
                "--gin_file=gin/runs/probe.gin",
                f'--gin.MODEL_DIR="{model_dir}"',
                '--gin.MIXTURE_OR_TASK_NAME="downstream_wiki_topic"',
                _lengths(self.size.finetune_lengths),
                f"--gin.probe.max_train_examples={self.size.probe_examples}",
                f"--gin.probe.max_test_examples={max(0, self.size.decode_examples)}",
            ]
        )

    def generator(self, name: str) -> tuple[Path, dict]:
        """SSR records filled by generator `name`: "large" (the generator size, trained
        generator_steps) or "student" (the student's own seed-0 span-corruption checkpoint)."""
        size = self.size
        records_dir = self.runs / "ssr_records" / name
        bindings = size.generator_bindings if name == "large" else ()
        generator_dir = None
        if not (records_dir / "summary.json").exists():
            if name == "large":
                generator_dir = self.pretrain(
                    "ssr_generator_large",
                    0,
                    self.pretrain_tasks["span_corruption"],
                    model_bindings=bindings,
                    steps=size.generator_steps,
                )
            else:
                generator_dir = self.span_corruption(0)
        summary = generate_ssr_records(
            size,
            generator_dir,
            records_dir,
            self.pretrain_tasks["span_corruption"],
            self.spm_path,
            bindings,
        )
        return records_dir, summary

    def ssr(self, tasks: Sequence[str]) -> dict:
        tasks = stage_tasks(SSR_TASKS, tasks)
        records = {name: self.generator(name) for name in ("large", "student")}
        generators = {
            name: {
                "examples": summary["examples"],
                "kept": summary["kept"],
                "drop_rate": 1.0 - summary["kept"] / summary["examples"],
                "dropped": summary.get("dropped", {}),
            }
            for name, (_, summary) in records.items()
        }
        runs: dict = {}
        for seed in self.seeds:
            for arm in SSR_ARMS:
                if arm == "continued_span_corruption":
                    task, extra = self.pretrain_tasks["span_corruption"], ()
                else:
                    generator = arm.removeprefix("continued_ssr_")
                    task, extra = None, self.ssr_gin(generator, records[generator][0])
                checkpoint = self.continued(arm, seed, task, extra)
                for dataset in tasks:
                    metrics = self.finetune(arm, seed, dataset, checkpoint)
                    runs.setdefault(arm, {}).setdefault(dataset, {})[str(seed)] = metrics
                self.write(
                    "ssr", tasks, runs, SSR_COMPARISONS, False, SSR_ARMS,
                    {"generators": generators},
                )  # fmt: skip
        return self.write(
            "ssr", tasks, runs, SSR_COMPARISONS, True, SSR_ARMS, {"generators": generators}
        )

    def ssr_gin(self, generator: str, records_dir: Path) -> list[str]:
        """The student's continuation on a 50/50 mix of SSR records and span corruption."""
        return [
            "--gin_file=gin/objectives/ssr.gin",
            f'--gin.SSR_RECORDS_DIR="{records_dir}"',
            "--gin.SSR_SPAN_CORRUPTION_RATE=0.5",
            f'--gin.ssr_mixture_or_task.name="study_ssr_{generator}"',
            f'--gin.ssr_mixture_or_task.vocabulary_model="{self.spm_path}"',
            "--gin.ssr_mixture_or_task.span_corruption_task="
            f'"{self.pretrain_tasks["span_corruption"]}"',
        ]

    # ------------------------------------------------------------------ results

    def curves(self, names: Sequence[str]) -> dict:
        return {
            name: {
                str(seed): read_curve(
                    self.runs / "pretrain" / name / f"seed{seed}" / "train_metrics.jsonl"
                )
                for seed in self.seeds
            }
            for name in names
        }

    def seconds(self) -> float:
        """The seconds the runs this stage used have taken, over every session (a checkpoint
        shared with an earlier stage counts in both)."""
        paths = [d / "seconds.json" for d in self.used]
        return sum(json.loads(p.read_text()) for p in paths if p.exists())

    def write(
        self,
        stage: str,
        tasks: Sequence[str],
        runs: dict,
        comparisons: Sequence[tuple[str, str]],
        finished: bool,
        curves: Sequence[str] = ("span_corruption",),
        extra: dict | None = None,
    ) -> dict:
        """The stage's results.json (and, once finished, results.md and its plots)."""
        out_dir = self.root / stage
        results = {
            "stage": stage,
            "status": "finished" if finished else "partial",
            "size_name": self.size_name,
            "settings": stage_settings(stage, self.size_name, self.size),
            "seeds": self.seeds,
            "tasks": list(tasks),
            "headline_metrics": {t: HEADLINES[t] for t in tasks},
            "machine": machine_description(),
            "date": time.strftime("%Y-%m-%d"),
            "runs_seconds": round(self.seconds(), 1),
            "runs": runs,
            "comparisons": [
                {"arm": arm, "reference": reference, **paired_differences(runs, arm, reference)}
                for arm, reference in comparisons
            ],
            "cross_entropy": [
                {
                    "arm": arm,
                    "reference": reference,
                    **paired_differences(runs, arm, reference, "cross_entropy"),
                }
                for arm, reference in comparisons
                if stage != "e2s2"  # its probe rows have no cross-entropy
            ],
            "curves": self.curves(curves),
            **(extra or {}),
        }
        if stage == "sensitivity":
            results["gate"] = sensitivity_verdict(results["comparisons"][0], tasks)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        if finished:
            write_stage_outputs(results, out_dir)
        return results


def run_stage(stage: str, size_name: str, root: Path, seeds: Sequence[int], tasks) -> dict:
    check_settings(root / stage, stage_settings(stage, size_name, SIZES[size_name]))
    runner = StageRunner(size_name, root, seeds)
    return getattr(runner, stage)(tasks)
