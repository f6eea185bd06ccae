"""The CPU demo: the Gin trainer end to end on the bundled corpus, in a few minutes.

1. pretrain the tiny T5 1.1 with span corruption (`main train`, gin/runs/smoke.gin), loss
   printed as it falls and evaluated on the validation split;
2. evaluate the checkpoint (`main eval`);
3. decode a few validation examples with beam search (`main infer`);
4. fine-tune it on `bundled_restore_case` and report the task's metrics (exact match, word
   accuracy) on greedy decodes.

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


def run(argv: list[str]) -> None:
    print("\n$ python -m e2s2_jax.main " + " ".join(shlex.quote(a) for a in argv), flush=True)
    gin.clear_config()
    code = entry.main(argv)
    if code:
        raise SystemExit(code)


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
    parser.add_argument("--finetune_steps", type=int, default=300)
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

    print(f"\n== 4. fine-tune on bundled_restore_case for {args.finetune_steps} steps")
    run(
        [
            "train",
            MODEL,
            "--gin_file=gin/runs/finetune.gin",
            f'--gin.MODEL_DIR="{finetune_dir}"',
            f'--gin.INITIAL_CHECKPOINT="{pretrain_dir}"',
            '--gin.MIXTURE_OR_TASK_NAME="bundled_restore_case"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
            f"--gin.TRAIN_STEPS={args.finetune_steps}",
            "--gin.train.log_every=100",
            "--gin.train.eval_every=0",
            "--gin.train.checkpoint_every=1000",
        ]
    )
    run(
        [
            "eval",
            MODEL,
            "--gin_file=gin/runs/eval.gin",
            f'--gin.MODEL_DIR="{finetune_dir}"',
            '--gin.MIXTURE_OR_TASK_NAME="bundled_restore_case"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
            "--gin.evaluate.max_decode_examples=32",
        ]
    )
    print(
        f"\ndemo done in {time.time() - start:.0f}s; runs, TensorBoard logs and checkpoints "
        f"are in {args.model_dir}"
    )


if __name__ == "__main__":
    main()
