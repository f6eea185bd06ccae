"""SurfaceFusion's cost relative to the plain model, in one run: train-step time and greedy and
beam decoding tokens/s. Prints one JSON object.

Both models share sizes, batch and data; each function is compiled first, then timed with
`block_until_ready`, plain and fused runs interleaved (so that load from other processes on a
shared machine falls on both alike), median of `--repeats`. Decoding runs the full
`--decode_length` steps (eos is set to an id the model never emits, so no row stops early);
beam search (`--num_beams`, 0 to skip) counts the best beam's tokens, as `benchmarks/decode.py`.

  python benchmarks/fusion.py --model tiny
  python benchmarks/fusion.py --model small --batch 4 --input_length 512 --target_length 114
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time

import jax
import numpy as np

from e2s2_jax.decoding import DecodeConfig, make_predict_fn
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.fusion import SurfaceFusion
from e2s2_jax.models.t5 import T5
from e2s2_jax.objectives import Seq2SeqObjective
from e2s2_jax.training import flops, optimizers, partitioning
from e2s2_jax.training.train_state import init_train_state
from e2s2_jax.training.train_step import make_train_step

# gin/models/t5_1_1_tiny.gin and t5_1_1_small.gin sizes (T5Config's defaults are T5 1.1 small).
SIZES = {
    "tiny": T5Config(
        vocab_size=8192,
        d_model=64,
        d_ff=128,
        num_heads=4,
        d_kv=16,
        num_encoder_layers=2,
        num_decoder_layers=2,
    ),
    "small": T5Config(),
}


def _interleaved_median_seconds(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        jax.block_until_ready(fn())  # Compile (and warm up) first.
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _batch(config: T5Config, batch: int, input_length: int, target_length: int) -> dict:
    rng = np.random.default_rng(0)
    targets = rng.integers(2, config.vocab_size, (batch, target_length)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, config.vocab_size, (batch, input_length)).astype(
            np.int32
        ),
        "decoder_input_tokens": np.concatenate(
            [np.zeros((batch, 1), np.int32), targets[:, :-1]], 1
        ),
        "decoder_target_tokens": targets,
    }


def _flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered function (None where the backend does not say)."""
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def benchmark_fns(model: T5, batch: dict, args) -> tuple[dict, float | None]:
    """`({"train": fn, "greedy": fn[, "beam": fn]}, train_step_xla_flops)`; the fns are
    no-argument calls to time."""
    optimizer = optimizers.make_optimizer("adafactor", 1e-3)
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = make_train_step(
        model, optimizer, Seq2SeqObjective(), mesh, state_shardings=shardings, donate_state=False
    )
    decode_configs = {"greedy": DecodeConfig("greedy", max_decode_length=args.decode_length)}
    if args.num_beams:
        decode_configs["beam"] = DecodeConfig(
            "beam",
            max_decode_length=args.decode_length,
            num_beams=args.num_beams,
            stop_bound="max_length",
        )
    encoder_tokens = batch["encoder_input_tokens"]
    fns = {"train": lambda: step(state, batch, jax.random.key(1))}
    for name, decode_config in decode_configs.items():
        predict = make_predict_fn(model, decode_config)
        fns[name] = functools.partial(predict, state.params, encoder_tokens)
    return fns, _flops(step.lower(state, batch, jax.random.key(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--mode", default="hard")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_length", type=int, default=128)
    parser.add_argument("--target_length", type=int, default=32)
    parser.add_argument("--decode_length", type=int, default=32)
    parser.add_argument("--num_beams", type=int, default=4, help="0: no beam-search timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    # An eos id outside the vocabulary: decoding always runs `decode_length` steps.
    config = dataclasses.replace(SIZES[args.model], eos_id=SIZES[args.model].vocab_size)
    batch = _batch(config, args.batch, args.input_length, args.target_length)
    models = {
        "plain": T5(config),
        "surface_fusion": T5(
            config, output_layer_factory=functools.partial(SurfaceFusion, mode=args.mode)
        ),
    }
    fns, xla_flops = {}, {}
    for name, model in models.items():
        fns[name], xla_flops[name] = benchmark_fns(model, batch, args)
    seconds = {
        part: _interleaved_median_seconds({n: f[part] for n, f in fns.items()}, args.repeats)
        for part in fns["plain"]
    }
    tokens = args.batch * args.decode_length
    decodes = [part for part in seconds if part != "train"]
    plain, fused = (
        {
            "train_step_seconds": seconds["train"][name],
            **{
                f"{part}_decode_tokens_per_second": tokens / seconds[part][name] for part in decodes
            },
            "train_step_xla_flops": xla_flops[name],
            "train_step_model_flops": flops.step_flops(
                config,
                args.batch,
                args.input_length,
                args.target_length,
                model.output_layer_factory(config),
            ).train,
        }
        for name, model in models.items()
    )
    report = {
        "benchmark": "fusion",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        **vars(args),
        "plain": plain,
        "surface_fusion": fused,
        "train_step_overhead": fused["train_step_seconds"] / plain["train_step_seconds"] - 1,
        "train_step_flops_overhead": (
            fused["train_step_xla_flops"] / plain["train_step_xla_flops"] - 1
            if plain["train_step_xla_flops"]
            else None
        ),
        "train_step_model_flops_overhead": fused["train_step_model_flops"]
        / plain["train_step_model_flops"]
        - 1,
        **{
            f"{part}_decode_throughput_ratio": fused[f"{part}_decode_tokens_per_second"]
            / plain[f"{part}_decode_tokens_per_second"]
            for part in decodes
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
