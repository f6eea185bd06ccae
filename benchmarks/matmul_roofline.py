"""How fast a train step could be if it were only its matmuls: every `dot_general` of our traced
T5 train step (forward and backward of span corruption), each timed alone on this machine, in
XLA (our backend) and in torch (the peer's). Prints one JSON object.

What is timed: the loss's value-and-grad is traced (`jax.make_jaxpr`, nothing runs), its
`dot_general`s are collected with their shapes, dimension numbers and multiplicity (scan
bodies times their length), and each distinct one is run on random float32 operands of its
shapes: in JAX as `jax.jit(lax.dot_general)`, and in torch as the same contraction through
`torch.einsum` (which hands it to MKL's GEMM) with as many threads as this process has CPUs.
Each timing is the fastest of `--repeats` calls after one warm-up. `matmul_seconds` is the sum
over the step's dots of count x time: the step's time if everything else (elementwise work,
softmax, reductions, the optimizer update) were free and every dot ran as fast as alone.

That bounds what any framework can reach on this machine: a step cannot be faster than its
matmuls. RESULTS.md ("Train step") compares it with the measured steps of `train_step.py`.

  PYTHONPATH=. python benchmarks/matmul_roofline.py --model_gin gin/models/t5_1_1_small.gin
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
import time
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.extend import core  # noqa: E402

from benchmarks._common import load_model  # noqa: E402
from benchmarks.e2s2_step import synthetic_batch  # noqa: E402


def step_dots(jaxpr, multiplier: int = 1, counts: Counter | None = None) -> Counter:
    """`{(lhs_shape, rhs_shape, dimension_numbers): count}` of every float `dot_general` in
    `jaxpr` and its sub-jaxprs, a scan body's counted `length` times."""
    counts = Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            if np.issubdtype(lhs.dtype, np.floating):
                key = (tuple(lhs.shape), tuple(rhs.shape), eqn.params["dimension_numbers"])
                counts[key] += multiplier
        length = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                sub = item.jaxpr if isinstance(item, core.ClosedJaxpr) else item
                if isinstance(sub, core.Jaxpr):
                    step_dots(sub, multiplier * length, counts)
    return counts


def traced_step_dots(model, batch: dict) -> Counter:
    """`step_dots` of span corruption's value-and-grad for `model` on `batch` (traced only)."""
    from e2s2_jax.objectives import Seq2SeqObjective

    params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
        )
    )["params"]
    objective = Seq2SeqObjective(z_loss=0.0)
    normalizers = objective.normalizers(batch)

    def loss(p):
        return objective(model, p, batch, normalizers, None)[0]

    return step_dots(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)


def einsum_equation(lhs_rank: int, rhs_rank: int, dimension_numbers) -> str:
    """The `einsum` equation of a `dot_general` (output: batch, lhs free, rhs free dims)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    letters = iter(string.ascii_letters)
    lhs = [next(letters) for _ in range(lhs_rank)]
    rhs = [None] * rhs_rank
    for left, right in zip(lhs_contract, rhs_contract, strict=True):
        rhs[right] = lhs[left]
    for left, right in zip(lhs_batch, rhs_batch, strict=True):
        rhs[right] = lhs[left]
    rhs = [name or next(letters) for name in rhs]
    out = [lhs[d] for d in lhs_batch]
    out += [lhs[d] for d in range(lhs_rank) if d not in lhs_contract and d not in lhs_batch]
    out += [rhs[d] for d in range(rhs_rank) if d not in rhs_contract and d not in rhs_batch]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def dot_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """2 x multiply-adds: every lhs element meets every free rhs index once."""
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    free_rhs = [d for d in range(len(rhs_shape)) if d not in rhs_contract and d not in rhs_batch]
    return 2 * math.prod(lhs_shape) * math.prod(rhs_shape[d] for d in free_rhs)


def fastest(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_dot(lhs_shape, rhs_shape, dimension_numbers, repeats: int, threads: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    lhs = rng.standard_normal(lhs_shape, dtype=np.float32)
    rhs = rng.standard_normal(rhs_shape, dtype=np.float32)
    ours = jax.jit(lambda a, b: lax.dot_general(a, b, dimension_numbers))
    a, b = jax.device_put(lhs), jax.device_put(rhs)
    torch.set_num_threads(threads)
    equation = einsum_equation(len(lhs_shape), len(rhs_shape), dimension_numbers)
    ta, tb = torch.from_numpy(lhs), torch.from_numpy(rhs)
    # Same contraction on both sides (checked on these operands), then timed.
    np.testing.assert_allclose(
        np.asarray(ours(a, b)), torch.einsum(equation, ta, tb).numpy(), rtol=2e-3, atol=2e-3
    )
    return {
        "ours_s": fastest(lambda: ours(a, b).block_until_ready(), repeats),
        "torch_s": fastest(lambda: torch.einsum(equation, ta, tb), repeats),
        "einsum": equation,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_small.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    model = load_model([args.model_gin])
    batch = synthetic_batch(
        0, args.batch_size, args.inputs_length, args.targets_length, model.config.vocab_size
    )
    dots = traced_step_dots(model, batch)
    threads = len(os.sched_getaffinity(0))
    rows, totals = [], {"flops": 0, "ours_s": 0.0, "torch_s": 0.0}
    for index, ((lhs_shape, rhs_shape, numbers), count) in enumerate(
        sorted(dots.items(), key=lambda item: -item[1] * dot_flops(*item[0]))
    ):
        flops = dot_flops(lhs_shape, rhs_shape, numbers)
        timed = time_dot(lhs_shape, rhs_shape, numbers, args.repeats, threads)
        print(
            f"[matmul_roofline] {index + 1}/{len(dots)} {timed['einsum']} {lhs_shape} x "
            f"{rhs_shape} (x{count}): ours {flops / timed['ours_s'] / 1e9:.0f}, "
            f"torch {flops / timed['torch_s'] / 1e9:.0f} GFLOP/s",
            file=sys.stderr,
            flush=True,
        )
        totals["flops"] += count * flops
        totals["ours_s"] += count * timed["ours_s"]
        totals["torch_s"] += count * timed["torch_s"]
        rows.append(
            {
                "lhs": lhs_shape,
                "rhs": rhs_shape,
                "einsum": timed["einsum"],
                "count": count,
                "gflop": round(flops / 1e9, 4),
                "ours_gflop_per_s": round(flops / timed["ours_s"] / 1e9, 1),
                "torch_gflop_per_s": round(flops / timed["torch_s"] / 1e9, 1),
            }
        )
    tokens = args.batch_size * (args.inputs_length + args.targets_length)
    print(
        json.dumps(
            {
                "benchmark": "matmul_roofline",
                "model_gin": args.model_gin,
                "batch": [args.batch_size, args.inputs_length, args.targets_length],
                "tokens_per_step": tokens,
                "threads": threads,
                "distinct_dots": len(dots),
                "dots_per_step": sum(dots.values()),
                "matmul_gflop_per_step": round(totals["flops"] / 1e9, 2),
                "matmul_seconds": {
                    "ours": round(totals["ours_s"], 3),
                    "torch": round(totals["torch_s"], 3),
                },
                "matmul_gflop_per_s": {
                    "ours": round(totals["flops"] / totals["ours_s"] / 1e9, 1),
                    "torch": round(totals["flops"] / totals["torch_s"] / 1e9, 1),
                },
                "max_tokens_per_s": {
                    "ours": round(tokens / totals["ours_s"], 1),
                    "torch": round(tokens / totals["torch_s"], 1),
                },
                "jax": jax.__version__,
                "dots": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
