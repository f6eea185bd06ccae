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
from e2s2_jax.study_common import log, machine_description, read_curve, run_main


@dataclasses.dataclass(frozen=True)
class StageSize:
    """One size of the staged study: the model, every budget and the evaluation."""

    model_gin: str
    generator_bindings: tuple[str, ...]  # the SSR generator: the model file made larger
    pretrain_steps: int  # span-corruption pretraining (sensitivity) and each continuation
    pretrain_batch: int
    pretrain_lengths: tuple[int, int]
    pretrain_peak_lr: float
    continue_steps: int  # each arm's continued pretraining from span corruption (e2s2, ssr)
    finetune_steps: int
    finetune_batch: int
    finetune_lengths: tuple[int, int]
    finetune_lr: float
    translation_steps: int  # SurfaceFusion: translation trained from scratch
    translation_batch: int
    translation_lengths: tuple[int, int]
    translation_peak_lr: float
    generator_steps: int
    ssr_examples: int
    decode_batch: int
    decode_examples: int  # test examples decoded for the task metrics; -1: the whole split
    probe_examples: int  # wiki_topic train examples the probe fits on (0: all)


SIZES = {
    # A few steps of everything, for the tests (the numbers mean nothing).
    "smoke": StageSize(
        model_gin="gin/models/t5_1_1_tiny.gin",
        generator_bindings=("T5Config.d_model=96", "T5Config.num_encoder_layers=3"),
        pretrain_steps=3,
        pretrain_batch=8,
        pretrain_lengths=(64, 16),
        pretrain_peak_lr=0.01,
        continue_steps=2,
        finetune_steps=2,
        finetune_batch=8,
        finetune_lengths=(32, 16),
        finetune_lr=1e-3,
        translation_steps=2,
        translation_batch=8,
        translation_lengths=(32, 16),
        translation_peak_lr=0.01,
        generator_steps=3,
        ssr_examples=32,
        decode_batch=8,
        decode_examples=8,
        probe_examples=64,
    ),
    # 2 CPU cores, about 2.5 hours a stage (see gin/models/t5_1_1_study_medium.gin).
    "medium": StageSize(
        model_gin="gin/models/t5_1_1_study_medium.gin",
        generator_bindings=(
            "T5Config.d_model=192",
            "T5Config.d_ff=512",
            "T5Config.num_heads=6",
            "T5Config.num_encoder_layers=4",
            "T5Config.num_decoder_layers=4",
        ),
        pretrain_steps=2000,
        pretrain_batch=32,
        pretrain_lengths=(128, 32),
        pretrain_peak_lr=0.01,
        continue_steps=500,
        finetune_steps=300,
        finetune_batch=32,
        finetune_lengths=(128, 64),
        finetune_lr=1e-3,
        translation_steps=800,
        translation_batch=32,
        translation_lengths=(64, 64),
        translation_peak_lr=0.01,
        generator_steps=3000,
        ssr_examples=8192,
        decode_batch=64,
        decode_examples=-1,
        probe_examples=0,
    ),
    # T5 1.1 small on an accelerator (study/device/<stage>.sh).
    "small": StageSize(
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
        continue_steps=5000,
        finetune_steps=2000,
        finetune_batch=64,
        finetune_lengths=(256, 128),
        finetune_lr=1e-3,
        translation_steps=20000,
        translation_batch=128,
        translation_lengths=(128, 128),
        translation_peak_lr=0.01,
        generator_steps=40000,
        ssr_examples=200_000,
        decode_batch=256,
        decode_examples=-1,
        probe_examples=0,
    ),
}

# The fields of StageSize each stage's runs depend on: a resumed stage refuses other values.
STAGE_FIELDS = {
    "sensitivity": ("model_gin", "pretrain_", "finetune_", "decode_"),
    "surface_fusion": ("model_gin", "translation_", "decode_"),
    "e2s2": ("model_gin", "pretrain_", "continue_", "finetune_", "decode_", "probe_"),
    "ssr": ("model_gin", "pretrain_", "continue_", "finetune_", "decode_", "generator_", "ssr_"),
}
STAGES = tuple(STAGE_FIELDS)

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

# e2s2: {arm: (pretraining task kind, Gin arguments)}, each continuing span corruption.
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
}
PROBE = "probe_wiki_topic"  # the frozen-encoder linear probe, reported like a task
E2S2_TASKS = ("spelling_grammar", "wiki_topic")
E2S2_COMPARISONS = [
    ("continued_e2s2", "continued_span_corruption"),
    ("continued_e2s2_strong", "continued_span_corruption"),
]

# ssr: the student continues on SSR records mixed 50/50 with span corruption, filled by a
# generator larger than it or by one of its own size, against span corruption alone.
SSR_ARMS = ("continued_span_corruption", "continued_ssr_large", "continued_ssr_student")
SSR_TASKS = ("kjv_to_web", "spelling_grammar")
SSR_COMPARISONS = [
    ("continued_ssr_large", "continued_span_corruption"),
    ("continued_ssr_student", "continued_span_corruption"),
]


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


def check_stage_settings(out_dir: Path, settings: dict) -> None:
    """Records a stage's settings in out_dir/settings.json, or refuses to resume runs made
    with other settings (a finished run is recognised by its step count alone)."""
    path = out_dir / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = sorted(
                k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k)
            )
            raise SystemExit(
                f"error: {out_dir} holds a stage run with other settings (differing: "
                f"{changed}; see {path}): pass another --out, or delete {path} and the "
                "stage's runs to start again"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))


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
        if translation:  # from scratch: the pretraining optimizer, warm-up then cosine decay
            steps, batch, lengths = (
                size.translation_steps,
                size.translation_batch,
                size.translation_lengths,
            )
            schedule = [
                "--gin_file=gin/runs/adamw.gin",
                f"--gin.optax.warmup_cosine_decay_schedule.peak_value={size.translation_peak_lr}",
                f"--gin.optax.warmup_cosine_decay_schedule.warmup_steps={max(1, steps // 10)}",
            ]
        else:
            steps, batch, lengths = size.finetune_steps, size.finetune_batch, size.finetune_lengths
            schedule = [f"--gin.optax.constant_schedule.value={size.finetune_lr}"]
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
        tasks = [t for t in tasks if t in TRANSLATION_TASKS] or list(TRANSLATION_TASKS)
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
        del tasks  # the stage's tasks are fixed: the probe, spelling_grammar, wiki_topic
        runs: dict = {}
        for seed in self.seeds:
            for arm, (task_kind, extra) in E2S2_ARMS.items():
                checkpoint = self.continued(arm, seed, self.pretrain_tasks[task_kind], extra)
                runs.setdefault(arm, {}).setdefault(PROBE, {})[str(seed)] = self.probe(checkpoint)
                for dataset in E2S2_TASKS:
                    metrics = self.finetune(arm, seed, dataset, checkpoint)
                    runs[arm].setdefault(dataset, {})[str(seed)] = metrics
                self.write("e2s2", (PROBE, *E2S2_TASKS), runs, E2S2_COMPARISONS, False, E2S2_ARMS)
        return self.write("e2s2", (PROBE, *E2S2_TASKS), runs, E2S2_COMPARISONS, True, E2S2_ARMS)

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
        if not (records_dir / "summary.json").exists():
            log(f"SSR records: generator {name} fills {size.ssr_examples} windows")
            run_main(
                [
                    "ssr-generate",
                    f"--gin_file={size.model_gin}",
                    "--gin_file=gin/runs/ssr_generate.gin",
                    *(f"--gin.{b}" for b in bindings),
                    f'--gin.GENERATOR_DIR="{generator_dir}"',
                    f'--gin.SSR_OUTPUT_DIR="{records_dir}"',
                    "--gin.ssr_generate.mixture_or_task_name="
                    f'"{self.pretrain_tasks["span_corruption"]}"',
                    f'--gin.ssr_generate.vocabulary_model="{self.spm_path}"',
                    f"--gin.ssr_generate.max_examples={size.ssr_examples}",
                    f"--gin.ssr_generate.max_words_per_example={size.pretrain_lengths[0] // 2}",
                    f"--gin.ssr_generate.max_input_length={size.pretrain_lengths[0]}",
                    "--gin.ssr_generate.examples_per_chunk=512",
                ]
            )
        summary = json.loads((records_dir / "summary.json").read_text())
        if not summary.get("kept"):
            raise RuntimeError(
                f"SSR generation kept no records ({records_dir}/summary.json): the generator "
                f"{generator_dir} is too weakly trained; give it more steps"
            )
        return records_dir, summary

    def ssr(self, tasks: Sequence[str]) -> dict:
        del tasks  # the stage's tasks are fixed: kjv_to_web, spelling_grammar
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
                for dataset in SSR_TASKS:
                    metrics = self.finetune(arm, seed, dataset, checkpoint)
                    runs.setdefault(arm, {}).setdefault(dataset, {})[str(seed)] = metrics
                self.write(
                    "ssr", SSR_TASKS, runs, SSR_COMPARISONS, False, SSR_ARMS,
                    {"generators": generators},
                )  # fmt: skip
        return self.write(
            "ssr", SSR_TASKS, runs, SSR_COMPARISONS, True, SSR_ARMS, {"generators": generators}
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
    check_stage_settings(root / stage, stage_settings(stage, size_name, SIZES[size_name]))
    runner = StageRunner(size_name, root, seeds)
    return getattr(runner, stage)(tasks)
