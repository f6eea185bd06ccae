"""How fast does the study's T5 learn to copy? Ours against Hugging Face `transformers`' PyTorch
T5 from the same initial weights, on the same batches, with the same optimizer. Prints JSON.

Why: at the study's medium size, the near-copy and translation tasks (kjv_to_web, kjv_to_sparv)
stay at a BLEU near zero after 500 fine-tuning steps, pretrained or not. This separates "our
model or trainer cannot learn what T5 can" from "T5 at this size needs more steps": the task
is the purest copy there is (inputs = targets = random tokens drawn uniformly from
`--vocab_range`, then EOS), so a model that learned to copy has a cross-entropy near 0, and one
that did not stays near the uniform `ln(V)`.

Both sides: plain AdamW (b1 0.9, b2 0.999, eps 1e-8, no weight decay), linear warm-up over the
first 10% of the steps then cosine decay to 0, gradients clipped to global norm 1, dropout 0,
float32. The training cross-entropy of the step's batch is reported every `--log_every` steps
(the two curves are two training runs, so they agree statistically, not bit for bit: float
rounding differs from the first step on and grows with training).

  PYTHONPATH=. python benchmarks/copy_task.py  # the study's medium model, 50-token copies
  PYTHONPATH=. python benchmarks/copy_task.py --vocab_range 200,8000 --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks._common import hf_model_from_params, load_model  # noqa: E402

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def copy_batches(seed: int, steps: int, batch_size: int, length: int, low: int, high: int):
    """`steps` batches of `[batch, length]` rows: random tokens in [low, high), then EOS (1)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        tokens = rng.integers(low, high, (batch_size, length)).astype(np.int32)
        tokens[:, -1] = 1
        yield tokens


def seq2seq_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The trainer's batch for copying `tokens` (one segment per row, no padding)."""
    ones = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).copy()
    shifted = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": tokens,
        "encoder_segment_ids": ones,
        "encoder_positions": positions,
        "decoder_input_tokens": shifted,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": ones,
        "decoder_segment_ids": ones,
        "decoder_positions": positions,
    }


def schedule_value(step: int, peak: float, steps: int) -> float:
    """Linear warm-up over 10% of `steps`, then cosine decay to 0 (optax's, as a float)."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def initial_state(model, args):
    """`(state, shardings, mesh, optimizer)`: our train state at step 0 (its params are the
    initial weights of both contenders)."""
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(1, args.steps // 10), args.steps, 0.0
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, eps=1e-8, weight_decay=0.0)
    )
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(args.seed))
    return state, shardings, mesh, optimizer


def train_ours(model, initial, batches, args) -> list[list[float]]:
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_step import make_train_step

    state, shardings, mesh, optimizer = initial
    step = make_train_step(
        model, optimizer, Seq2SeqObjective(z_loss=0.0), mesh, state_shardings=shardings
    )
    curve = []
    for index, tokens in enumerate(batches, start=1):
        batch = partitioning.make_global_batch(seq2seq_batch(tokens), mesh)
        state, metrics = step(state, batch, jax.random.key(index))
        if index % args.log_every == 0:
            metrics = jax.device_get(metrics)
            curve.append([index, round(float(metrics["cross_entropy"]), 4)])
            print(f"[copy_task] ours step {index}: {curve[-1][1]}", file=sys.stderr, flush=True)
    return curve


def train_hf(config, params, batches, args) -> list[list[float]]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_model_from_params(config, params).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_value(step, 1.0, args.steps)
    )
    curve = []
    for index, tokens in enumerate(batches, start=1):
        batch = seq2seq_batch(tokens)
        loss = model(
            input_ids=torch.as_tensor(batch["encoder_input_tokens"], dtype=torch.long),
            decoder_input_ids=torch.as_tensor(batch["decoder_input_tokens"], dtype=torch.long),
            labels=torch.as_tensor(batch["decoder_target_tokens"], dtype=torch.long),
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if index % args.log_every == 0:
            curve.append([index, round(float(loss.detach()), 4)])
            print(f"[copy_task] hf step {index}: {curve[-1][1]}", file=sys.stderr, flush=True)
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_study_medium.gin")
    parser.add_argument("--vocab_range", default="200,250", help="low,high: tokens [low, high)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default="ours,hf")
    args = parser.parse_args(argv)
    import gin

    gin.add_config_file_search_path(GIN_DIR)
    low, high = (int(v) for v in args.vocab_range.split(","))
    model = load_model([args.model_gin], ["T5Config.dropout_rate=0.0"])
    if not 2 <= low < high <= model.config.vocab_size:
        parser.error(f"--vocab_range {args.vocab_range}: need 2 <= low < high <= vocab size")
    initial = initial_state(model, args)
    params = jax.device_get(initial[0].params)
    result = {
        "model_gin": args.model_gin,
        "task": f"copy {args.length - 1} uniform tokens from [{low}, {high}) then EOS",
        "uniform_cross_entropy": round(math.log(high - low) * (args.length - 1) / args.length, 4),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "peak_lr": args.lr,
        "device": jax.devices()[0].device_kind,
    }
    train = {"ours": lambda b: train_ours(model, initial, b, args)}
    train["hf"] = lambda b: train_hf(model.config, params, b, args)
    for name in args.contenders.split(","):
        batches = copy_batches(args.seed, args.steps, args.batch_size, args.length, low, high)
        start = time.perf_counter()
        result[name] = {"cross_entropy": train[name](batches)}
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
