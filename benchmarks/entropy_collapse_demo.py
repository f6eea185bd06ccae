"""sigmaReparam against attention-entropy collapse, on the tiny model on CPU: the same run at a
high learning rate with and without `gin/models/sigma_reparam.gin`, the attention entropy of
every layer kind logged every `--entropy_every` steps; prints one JSON object (each arm's loss
and entropies at the start, the lowest and the end) and draws the curves.

Each arm is `python -m e2s2_jax.main train` with the smoke recipe (tiny T5 1.1, span corruption
on the bundled corpus, RMS-scaled AdamW with clipping at 1.0, batch 32 of 128/32 tokens), the
peak learning rate `--lr` after `--warmup` steps, then cosine decay; non-finite steps are
skipped (and counted) rather than stopping the run, so both curves run to the end.

  PYTHONPATH=. python benchmarks/entropy_collapse_demo.py --lr 0.3 --steps 300 \\
      --out_dir /tmp/entropy_demo --plot benchmarks/entropy_collapse.png
  # redraw from finished runs: add --plot_only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("encoder_self", "decoder_self", "cross")
ARMS = {"plain": (), "sigma_reparam": ("--gin_file=gin/models/sigma_reparam.gin",)}


def train_command(args, arm: str) -> list[str]:
    return [
        sys.executable, "-m", "e2s2_jax.main", "train",
        "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
        "--gin_file=gin/runs/smoke.gin", *ARMS[arm],
        f'--gin.MODEL_DIR="{os.path.join(args.out_dir, arm)}"',
        f"--gin.TRAIN_STEPS={args.steps}",
        f"--gin.optax.warmup_cosine_decay_schedule.peak_value={args.lr}",
        f"--gin.optax.warmup_cosine_decay_schedule.warmup_steps={args.warmup}",
        f"--gin.train.log_every={args.entropy_every}",
        f"--gin.train.attention_entropy_every={args.entropy_every}",
        "--gin.train.eval_every=0", "--gin.train.checkpoint_every=100000",
        f"--gin.train.skip_nonfinite_steps={args.steps}",
    ]  # fmt: skip


def read_curves(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(records: list[dict]) -> dict:
    with_entropy = [r for r in records if f"attention_entropy/{KINDS[0]}" in r]
    first, last = with_entropy[0], with_entropy[-1]
    out = {
        "loss_first": round(first["loss"], 3),
        "loss_last": round(last["loss"], 3),
        "loss_min": round(min(r["loss"] for r in records), 3),
        "nonfinite_steps_logged": int(sum(r.get("nonfinite", 0) for r in records)),
    }
    for kind in KINDS:
        values = [r[f"attention_entropy/{kind}"] for r in with_entropy]
        out[f"entropy_{kind}"] = {
            "first": round(values[0], 3),
            "min": round(min(values), 3),
            "last": round(values[-1], 3),
        }
    return out


def plot(curves: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for arm, records in curves.items():
        style = "-" if arm == "sigma_reparam" else "--"
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["loss"] for r in records], style, label=arm)
        for axis, kind in zip(axes[1:], KINDS, strict=True):
            axis.plot(steps, [r[f"attention_entropy/{kind}"] for r in records], style, label=arm)
            axis.set_title(f"attention entropy: {kind} (nats)")
    axes[0].set_title("train loss")
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--entropy_every", type=int, default=10)
    parser.add_argument("--out_dir", default="/tmp/entropy_demo")
    parser.add_argument("--plot", default="benchmarks/entropy_collapse.png")
    parser.add_argument("--plot_only", action="store_true")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    curves = {}
    for arm in ARMS:
        if not args.plot_only:
            subprocess.run(train_command(args, arm), cwd=REPO, env=env, check=True)
        curves[arm] = read_curves(os.path.join(args.out_dir, arm))
    title = f"tiny T5 1.1, RMS-scaled AdamW, peak lr {args.lr} (warm-up {args.warmup})"
    plot(curves, args.plot, title)
    print(json.dumps({"lr": args.lr, **{arm: summarise(c) for arm, c in curves.items()}}, indent=1))


if __name__ == "__main__":
    main()
