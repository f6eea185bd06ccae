"""The CPU demo: pretrain a tiny T5 1.1 on the bundled corpus, evaluate, decode a few examples.

A stand-in for the Gin-configured trainer of issue 4 (`e2s2_jax.main`), built from the same
pieces: the SeqIO task, the packing feature converter, the sharded train step and decoding.
Run: `./launch.sh demo` (or `python -m e2s2_jax.demo --help`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402

import tasks  # noqa: E402,F401  (registers the bundled tasks)
from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter  # noqa: E402
from e2s2_jax.decoding import DecodeConfig, make_predict_fn  # noqa: E402
from e2s2_jax.models.t5 import T5, T5Config  # noqa: E402
from e2s2_jax.objectives import Seq2SeqObjective  # noqa: E402
from e2s2_jax.training import optimizers, partitioning  # noqa: E402
from e2s2_jax.training.train_state import init_train_state  # noqa: E402
from e2s2_jax.training.train_step import make_train_step  # noqa: E402

# gin/models/t5_1_1_tiny.gin, spelled out so the demo needs no Gin.
TINY = T5Config(
    vocab_size=8192,
    d_model=64,
    d_ff=128,
    num_heads=4,
    d_kv=16,
    num_encoder_layers=2,
    num_decoder_layers=2,
)


def batches(task: str, split: str, lengths: dict, batch_size: int, *, shuffle: bool, seed: int):
    dataset = seqio.get_dataset(
        task,
        task_feature_lengths=lengths,
        dataset_split=split,
        shuffle=shuffle,
        seed=seed,
        num_epochs=None if shuffle else 1,
        feature_converter=E2S2EncDecFeatureConverter(pack=True),
    ).batch(batch_size, drop_remainder=True)
    return dataset.as_numpy_iterator()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2s2_jax.demo", description=__doc__)
    parser.add_argument("--task", default="bundled_span_corruption")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    model = T5(TINY)
    mesh = partitioning.create_mesh()
    schedule = optimizers.rsqrt_schedule(1.0, warmup_steps=100)
    optimizer = optimizers.make_optimizer(
        "adamw_rms_scaled",
        lambda step: args.learning_rate * schedule(step) / schedule(100),
        gradient_clip_norm=1.0,
    )
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.PRNGKey(args.seed))
    train_step = make_train_step(
        model, optimizer, Seq2SeqObjective(z_loss=1e-4), mesh, state_shardings=shardings
    )
    train = batches(args.task, "train", lengths, args.batch_size, shuffle=True, seed=args.seed)
    print(
        f"demo: T5 1.1 tiny ({sum(x.size for x in jax.tree.leaves(state.params)):,} params) on "
        f"{args.task}, {args.steps} steps of {args.batch_size} packed rows",
        flush=True,
    )

    start = time.time()
    first_loss = None
    for step in range(1, args.steps + 1):
        batch = partitioning.make_global_batch(next(train), mesh)
        state, metrics = train_step(state, batch, jax.random.PRNGKey(step))
        if step % args.log_every == 0 or step == 1:
            loss = float(metrics["loss"])
            first_loss = loss if first_loss is None else first_loss
            elapsed = time.time() - start
            print(
                f"step {step:5d}  loss {loss:.3f}  {step / elapsed:.1f} steps/s  "
                f"eta {elapsed / step * (args.steps - step):.0f}s",
                flush=True,
            )

    @jax.jit
    def eval_sums(params, batch):
        objective = Seq2SeqObjective(z_loss=0.0)
        normalizers = objective.normalizers(batch)
        loss, _ = objective(model, params, batch, normalizers, None)
        return loss * normalizers["weight_sum"], normalizers["weight_sum"]

    total_loss = total_weight = 0.0
    validation = batches(args.task, "validation", lengths, args.batch_size, shuffle=False, seed=0)
    for batch in itertools.islice(validation, args.eval_batches):
        loss_sum, weight_sum = eval_sums(state.params, batch)
        total_loss, total_weight = total_loss + float(loss_sum), total_weight + float(weight_sum)
    print(
        f"validation loss {total_loss / total_weight:.3f} (train loss at step 1: "
        f"{first_loss:.3f}) over {int(total_weight)} target tokens"
    )

    vocabulary = seqio.get_mixture_or_task(args.task).output_features["targets"].vocabulary
    examples = seqio.get_mixture_or_task(args.task).get_dataset(
        lengths, split="validation", shuffle=False
    )
    examples = list(itertools.islice(examples.as_numpy_iterator(), 3))
    inputs = np.zeros((3, args.inputs_length), np.int32)
    for i, example in enumerate(examples):
        inputs[i, : len(example["inputs"])] = example["inputs"]
    predict = make_predict_fn(model, DecodeConfig("greedy", max_decode_length=args.targets_length))
    predictions = np.asarray(predict(state.params, jnp.asarray(inputs)).tokens)
    for example, prediction in zip(examples, predictions, strict=True):
        print("input:     ", vocabulary.decode(example["inputs"].tolist())[:300])
        print("target:    ", vocabulary.decode(example["targets"].tolist()))
        print("prediction:", vocabulary.decode(prediction.tolist()))


if __name__ == "__main__":
    main()
