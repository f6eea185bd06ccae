"""Cost of an E2S2 train step against a span-corruption step on the same model and batch; prints
JSON.

Three jitted train steps (`make_train_step`, Adafactor) on one synthetic batch of B rows:
`span_corruption` (Seq2SeqObjective, T5 without heads), `e2s2_two_views` (E2S2Objective's
defaults: both views, 2B rows through encoder and decoder, denoising head and NT-Xent) and
`e2s2_one_view` (nll_masked_weight = contrast_weight = 0: one pass over view N plus the head).
Each is compiled first (XLA's FLOP count of the compiled step is reported too), run once, then
timed over `--steps` steps ending in `block_until_ready`; the objectives alternate over
`--rounds` rounds; ratios use the median round and, separately, the fastest round.

    python benchmarks/e2s2_step.py --model_gin gin/models/t5_1_1_tiny.gin \
        [--batch_size 32] [--inputs_length 512] [--targets_length 114] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def synthetic_batch(
    seed: int, batch_size: int, inputs_length: int, targets_length: int, vocab_size: int
) -> dict[str, np.ndarray]:
    """Full rows (one segment each) of random tokens; view N replaces 15% of view M's tokens."""
    rng = np.random.default_rng(seed)
    masked = rng.integers(2, vocab_size, (batch_size, inputs_length)).astype(np.int32)
    replaced = rng.random(masked.shape) < 0.15
    noised = np.where(replaced, rng.integers(2, vocab_size, masked.shape), masked).astype(np.int32)
    targets = rng.integers(2, vocab_size, (batch_size, targets_length)).astype(np.int32)
    ones = np.ones_like
    return {
        "encoder_input_tokens": masked,
        "encoder_input_tokens_noised": noised,
        "encoder_noise_labels": (2 * replaced).astype(np.int32),
        "encoder_segment_ids": ones(masked),
        "encoder_positions": np.broadcast_to(np.arange(inputs_length), masked.shape).copy(),
        "decoder_input_tokens": np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": ones(targets),
        "decoder_segment_ids": ones(targets),
        "decoder_positions": np.broadcast_to(np.arange(targets_length), targets.shape).copy(),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_tiny.gin")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from benchmarks._common import host_malloc, model_config, time_train_steps
    from e2s2_jax.models.heads import DenoisingHead
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import E2S2Objective, Seq2SeqObjective
    from e2s2_jax.training import optimizers, partitioning

    config = model_config([args.model_gin])
    mesh = partitioning.create_mesh()
    optimizer = optimizers.make_optimizer("adafactor", optimizers.rsqrt_schedule())
    plain = T5(config)
    with_head = T5(config, encoder_heads=(("denoise", DenoisingHead),))
    settings = {
        "span_corruption": (plain, Seq2SeqObjective()),
        "e2s2_two_views": (with_head, E2S2Objective()),
        "e2s2_one_view": (
            with_head,
            E2S2Objective(nll_noised_weight=1.0, nll_masked_weight=0.0, contrast_weight=0.0),
        ),
    }
    batch = partitioning.make_global_batch(
        synthetic_batch(
            0, args.batch_size, args.inputs_length, args.targets_length, config.vocab_size
        ),
        mesh,
    )
    rounds, compile_seconds, flops, states = time_train_steps(
        settings, batch, mesh, optimizer, args.steps, args.rounds
    )
    # The median round, and the fastest (on a shared machine other load only slows a round).
    seconds = {name: statistics.median(values) for name, values in rounds.items()}
    fastest = {name: min(values) for name, values in rounds.items()}
    base = seconds["span_corruption"]
    print(
        json.dumps(
            {
                "model_gin": args.model_gin,
                "parameters": int(
                    sum(x.size for x in jax.tree.leaves(states["span_corruption"].params))
                ),
                "batch_size": args.batch_size,
                "inputs_length": args.inputs_length,
                "targets_length": args.targets_length,
                "steps_per_round": args.steps,
                "seconds_per_step": {k: round(v, 5) for k, v in seconds.items()},
                "rounds": {k: [round(x, 5) for x in v] for k, v in rounds.items()},
                "compile_seconds": {k: round(v, 1) for k, v in compile_seconds.items()},
                "ratio_two_views": round(seconds["e2s2_two_views"] / base, 3),
                "ratio_one_view": round(seconds["e2s2_one_view"] / base, 3),
                "ratio_two_views_fastest_rounds": round(
                    fastest["e2s2_two_views"] / fastest["span_corruption"], 3
                ),
                "ratio_one_view_fastest_rounds": round(
                    fastest["e2s2_one_view"] / fastest["span_corruption"], 3
                ),
                "xla_flops": flops,
                "flops_ratio_two_views": _ratio(flops["e2s2_two_views"], flops["span_corruption"]),
                "flops_ratio_one_view": _ratio(flops["e2s2_one_view"], flops["span_corruption"]),
                "targets": {"ratio_two_views": 2.1, "ratio_one_view": 1.15},
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "python": platform.python_version(),
                "host_malloc": host_malloc(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    from benchmarks._common import retain_freed_host_memory

    retain_freed_host_memory()
    main()
