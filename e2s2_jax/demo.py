"""The CPU demo: the Gin trainer end to end on the bundled corpus, in a few minutes.

1. pretrain the tiny T5 1.1 with span corruption (`main train`, gin/runs/smoke.gin), loss
   printed as it falls and evaluated on the validation split;
2. evaluate the checkpoint (`main eval`);
3. decode a few validation examples with beam search (`main infer`);
4. fine-tune it on `downstream_wiki_topic` (the lead of a Wikipedia article -> one of 12 topic
   labels, data/downstream/wiki_topic) and show the task's accuracy on greedy decodes of
   validation examples before (the pretrained checkpoint) and after fine-tuning, beside the
   majority label's rate, with a few predictions of both.

Each stage prints the equivalent command line. Run: `./launch.sh demo [--help]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402

from e2s2_jax import main as entry  # noqa: E402

MODEL = "--gin_file=gin/models/t5_1_1_tiny.gin"
# Stage 4: a short, regular mapping that the tiny model learns in a few hundred steps. A lead
# longer than 128 tokens is cut (the topic is plain from its first sentences); a label is at
# most 11 tokens.
FINETUNE_TASK = "downstream_wiki_topic"
FINETUNE_LENGTHS = {"inputs": 128, "targets": 16}
FINETUNE_LEARNING_RATE = 3e-3
SAMPLES = 12


def run(argv: list[str]) -> None:
    # The demo's own lines (stage headers, these commands, the results) are the command's output
    # to its reader, printed; the jobs it runs log through `e2s2_jax.console` to the same stdout.
    print("\n$ python -m e2s2_jax.main " + " ".join(shlex.quote(a) for a in argv), flush=True)
    gin.clear_config()
    code = entry.main(argv)
    if code:
        raise SystemExit(code)


def _last_eval(model_dir: str) -> dict:
    """The metrics of the newest `main eval` of MODEL_DIR (its eval_metrics.jsonl's last line)."""
    with open(os.path.join(model_dir, "eval_metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def _validation_pairs() -> list[tuple[str, str]]:
    # Importing `tasks` registers every task and builds the demo vocabulary on a first run: done
    # by stage 1's Gin files, after its header, not at `--help` (here and in `_decode_samples`).
    from tasks.downstream import dataset_files, read_tsv_examples

    return read_tsv_examples(dataset_files("wiki_topic")["validation"])


def _majority_rate(examples: int) -> tuple[str, float]:
    """The commonest label among the first `examples` validation targets (the ones `main eval`
    decodes), and its rate (%)."""
    labels = [target for _, target in _validation_pairs()[:examples]]
    label = max(set(labels), key=labels.count)
    return label, 100.0 * labels.count(label) / len(labels)


def _sample_examples(eval_examples: int) -> list[tuple[str, str]]:
    """(input, label) of SAMPLES validation examples spread evenly over the first
    `eval_examples` (the ones the accuracy counts), the input cut to its first 40 words (the
    model reads the first 128 tokens)."""
    pairs = _validation_pairs()[:eval_examples]
    picked = [pairs[i * len(pairs) // SAMPLES] for i in range(min(SAMPLES, len(pairs)))]
    return [(" ".join(text.split()[:40]), label) for text, label in picked]


def _print_finetune_summary(
    before: dict, after: dict, examples: list, samples: dict, eval_examples: int
) -> None:
    label, rate = _majority_rate(eval_examples)
    print(
        f"\n== {FINETUNE_TASK}: accuracy of greedy decodes on the first {eval_examples} "
        "validation examples"
    )
    print(f"  pretrained checkpoint:  {before['accuracy']:5.1f}%")
    print(f"  fine-tuned checkpoint:  {after['accuracy']:5.1f}%")
    print(f"  (always answering the commonest label, {label!r}: {rate:.1f}%)")
    before_right = sum(
        old == target for (_, target), old in zip(examples, samples["before"], strict=True)
    )
    right = sum(new == target for (_, target), new in zip(examples, samples["after"], strict=True))
    print(
        f"\n  {len(examples)} of them, evenly spaced ({right} right after fine-tuning, "
        f"{before_right} before):"
    )
    print(f"  {'input (start)':<44} {'label':<28} pretrained -> fine-tuned")
    for (text, target), old, new in zip(examples, samples["before"], samples["after"], strict=True):
        mark = "right" if new == target else "wrong"
        print(f"  {text[:42] + '..':<44} {target:<28} {old[:18] + '..'!r} -> {new!r} ({mark})")


def _decode_samples(pretrain_dir: str, finetune_dir: str, eval_examples: int):
    """(input, label) pairs of a few of the evaluated validation examples and the greedy decodes
    of both checkpoints: {"before": [...], "after": [...]}."""
    from tasks.downstream import DOWNSTREAM_SPECS  # not at the top: see `_validation_pairs`

    prefix = DOWNSTREAM_SPECS["wiki_topic"].prefix
    examples = _sample_examples(eval_examples)
    inputs_file = os.path.join(finetune_dir, "samples.txt")
    with open(inputs_file, "w") as f:
        f.writelines(f"{prefix}{text}\n" for text, _ in examples)
    samples = {}
    for name, model_dir in (("before", pretrain_dir), ("after", finetune_dir)):
        output = os.path.join(finetune_dir, f"samples_{name}.jsonl")
        run(
            [
                "infer",
                MODEL,
                "--gin_file=gin/runs/infer.gin",
                f'--gin.MODEL_DIR="{model_dir}"',
                f'--gin.infer.mixture_or_task_name="{FINETUNE_TASK}"',
                f'--gin.infer.input_file="{inputs_file}"',
                f'--gin.infer.output_file="{output}"',
                f"--gin.TASK_FEATURE_LENGTHS={FINETUNE_LENGTHS}",
                '--gin.DecodeConfig.method="greedy"',
                f"--gin.DecodeConfig.max_decode_length={FINETUNE_LENGTHS['targets']}",
            ]
        )
        with open(output) as f:
            samples[name] = [json.loads(line)["prediction"] for line in f]
    return examples, samples


def finetune(pretrain_dir: str, finetune_dir: str, steps: int, eval_examples: int) -> None:
    """Stage 4: evaluate the pretrained checkpoint on FINETUNE_TASK, fine-tune it, evaluate the
    result, and print the accuracy before and after with a few predictions of both."""
    finetune_task = [
        f'--gin.MIXTURE_OR_TASK_NAME="{FINETUNE_TASK}"',
        f"--gin.TASK_FEATURE_LENGTHS={FINETUNE_LENGTHS}",
    ]
    print(
        f"\n== 4. fine-tune on {FINETUNE_TASK} (Wikipedia lead -> one of 12 topics) for "
        f"{steps} steps, evaluated before and after"
    )
    decode = [
        f"--gin.evaluate.max_decode_examples={eval_examples}",
        f"--gin.DecodeConfig.max_decode_length={FINETUNE_LENGTHS['targets']}",
    ]

    def evaluate(model_dir) -> dict:
        run(
            ["eval", MODEL, "--gin_file=gin/runs/eval.gin", f'--gin.MODEL_DIR="{model_dir}"']
            + finetune_task
            + decode
        )
        return _last_eval(model_dir)

    print("\n-- the pretrained checkpoint, not fine-tuned: it has never seen a topic label")
    before = evaluate(pretrain_dir)
    run(
        [
            "train",
            MODEL,
            "--gin_file=gin/runs/finetune.gin",
            f'--gin.MODEL_DIR="{finetune_dir}"',
            f'--gin.INITIAL_CHECKPOINT="{pretrain_dir}"',
            *finetune_task,
            f"--gin.TRAIN_STEPS={steps}",
            f"--gin.optax.constant_schedule.value={FINETUNE_LEARNING_RATE}",
            f"--gin.train.log_every={max(steps // 4, 1)}",
            "--gin.train.eval_every=0",
            f"--gin.train.checkpoint_every={steps}",
        ]
    )
    print("\n-- the fine-tuned checkpoint")
    after = evaluate(finetune_dir)
    examples, samples = _decode_samples(pretrain_dir, finetune_dir, eval_examples)
    _print_finetune_summary(before, after, examples, samples, eval_examples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m e2s2_jax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model_dir",
        default=os.path.join(tempfile.gettempdir(), "e2s2_demo"),
        help="where the runs go (emptied first)",
    )
    parser.add_argument(
        "--objective",
        default="span_corruption",
        choices=("span_corruption", "e2s2"),
        help="pretraining objective (e2s2 uses gin/objectives/e2s2.gin)",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--finetune_steps", type=int, default=500)
    parser.add_argument(
        "--finetune_eval_examples",
        type=int,
        default=256,
        help="validation examples decoded for the accuracy before and after fine-tuning",
    )
    args = parser.parse_args(argv)

    start = time.time()
    shutil.rmtree(args.model_dir, ignore_errors=True)
    pretrain_dir = os.path.join(args.model_dir, "pretrain")
    finetune_dir = os.path.join(args.model_dir, "finetune")
    task = f"bundled_{args.objective}"
    objective_files = ["--gin_file=gin/objectives/e2s2.gin"] if args.objective == "e2s2" else []
    lengths = "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}"

    print(f"== 1. pretrain a tiny T5 1.1 ({args.objective}) for {args.steps} steps")
    run(
        [
            "train",
            MODEL,
            "--gin_file=gin/runs/pretrain.gin",
            "--gin_file=gin/runs/smoke.gin",
            *objective_files,
            f'--gin.MODEL_DIR="{pretrain_dir}"',
            f'--gin.MIXTURE_OR_TASK_NAME="{task}"',
            lengths,
            f"--gin.TRAIN_STEPS={args.steps}",
        ]
    )

    print("\n== 2. evaluate the pretrained checkpoint on the validation split")
    run(
        [
            "eval",
            MODEL,
            "--gin_file=gin/runs/eval.gin",
            *objective_files,
            f'--gin.MODEL_DIR="{pretrain_dir}"',
            f'--gin.MIXTURE_OR_TASK_NAME="{task}"',
            lengths,
        ]
    )

    print("\n== 3. decode three validation examples (beam search, 4 beams)")
    run(
        [
            "infer",
            MODEL,
            "--gin_file=gin/runs/infer.gin",
            f'--gin.MODEL_DIR="{pretrain_dir}"',
            '--gin.infer.mixture_or_task_name="bundled_span_corruption"',
            lengths,
            "--gin.infer.max_examples=3",
            "--gin.DecodeConfig.max_decode_length=32",
        ]
    )
    with open(os.path.join(pretrain_dir, "inference.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            print(f"  input:      {record['input'][:110]}")
            print(f"  target:     {record['target'][:110]}")
            print(f"  prediction: {record['prediction'][:110]}  (score {record['score']:.2f})")

    finetune(pretrain_dir, finetune_dir, args.finetune_steps, args.finetune_eval_examples)
    print(
        f"\ndemo done in {time.time() - start:.0f}s; runs, TensorBoard logs and checkpoints "
        f"are in {args.model_dir}"
    )


if __name__ == "__main__":
    main()
