"""Cost of the RTS / C-RTS and SLM train steps against a span-corruption step on the same model
and batch; prints JSON.

Jitted train steps (`make_train_step`, Adafactor) on one synthetic batch of B full rows:
`span_corruption` (Seq2SeqObjective, T5 without heads); `rts` (E2S2Objective over the swapped
view alone: one pass, the 2-way `RTSHead`; C-RTS's step is the same program, its substitutes
differ only in the data); `slm_all_positions` (the `SLMHead` with vocabulary logits at every
encoder position) and `slm_96_positions` (`slm_positions_per_row=96`, 15% of 512 rounded up
past the row's swaps). The objectives alternate within each of `--rounds` rounds of `--steps`
steps (other load on a shared machine then slows all of them alike); the report gives each
one's median round, the spread (min, max) and the ratios to span corruption by the median
and by the fastest rounds, and XLA's FLOP count of each compiled step.

    python benchmarks/encoder_views_step.py --model_gin gin/models/t5_1_1_small.gin \
        [--batch_size 8] [--inputs_length 512] [--targets_length 114] [--steps 2] [--rounds 5] \
        [--objectives rts,slm_all_positions,slm_96_positions]
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_tiny.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--objectives",
        default="span_corruption,rts,slm_all_positions,slm_96_positions",
        help="comma-separated; span_corruption is always timed (the ratios' base). At T5-small "
        "the four together took over 10 GB of host memory; run them in two groups there",
    )
    args = parser.parse_args(argv)

    from benchmarks._common import host_malloc, model_config, time_train_steps
    from benchmarks.e2s2_step import synthetic_batch
    from e2s2_jax.data import view_labels
    from e2s2_jax.models.heads import RTSHead, SLMHead
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import E2S2Objective, Seq2SeqObjective
    from e2s2_jax.training import optimizers, partitioning

    config = model_config([args.model_gin])
    mesh = partitioning.create_mesh()
    optimizer = optimizers.make_optimizer("adafactor", optimizers.rsqrt_schedule())
    one_view = dict(
        nll_noised_weight=1.0,
        nll_masked_weight=0.0,
        contrast_weight=0.0,
        replaced_label=view_labels.SWAP_REPLACED,
    )
    slm_model = T5(config, encoder_heads=(("slm", SLMHead),))
    slm = dict(one_view, denoise_weight=0.0, slm_weight=1.0)
    settings = {
        "span_corruption": (T5(config), Seq2SeqObjective()),
        "rts": (
            T5(config, encoder_heads=(("rts", RTSHead),)),
            E2S2Objective(**one_view, denoise_weight=1.0, denoise_head="rts"),
        ),
        "slm_all_positions": (slm_model, E2S2Objective(**slm)),
        "slm_96_positions": (slm_model, E2S2Objective(**slm, slm_positions_per_row=96)),
    }
    chosen = {"span_corruption", *args.objectives.split(",")}
    unknown = sorted(chosen - set(settings))
    if unknown:
        parser.error(f"--objectives: unknown {unknown}; choose from {sorted(settings)}")
    settings = {name: value for name, value in settings.items() if name in chosen}
    host_batch = synthetic_batch(
        0, args.batch_size, args.inputs_length, args.targets_length, config.vocab_size
    )
    # The swapped view's labels: 1 where replaced (e2s2_step's batch labels them 2).
    host_batch["encoder_noise_labels"] = (host_batch["encoder_noise_labels"] > 0).astype("int32")
    batch = partitioning.make_global_batch(host_batch, mesh)
    rounds, compile_seconds, flops, states = time_train_steps(
        settings, batch, mesh, optimizer, args.steps, args.rounds
    )
    median = {name: statistics.median(values) for name, values in rounds.items()}
    fastest = {name: min(values) for name, values in rounds.items()}
    base = "span_corruption"
    print(
        json.dumps(
            {
                "model_gin": args.model_gin,
                "batch_size": args.batch_size,
                "inputs_length": args.inputs_length,
                "targets_length": args.targets_length,
                "steps_per_round": args.steps,
                "seconds_per_step_median": {k: round(v, 4) for k, v in median.items()},
                "seconds_per_step_spread": {
                    k: [round(min(v), 4), round(max(v), 4)] for k, v in rounds.items()
                },
                "rounds": {k: [round(x, 4) for x in v] for k, v in rounds.items()},
                "ratio_median": {k: round(v / median[base], 3) for k, v in median.items()},
                "ratio_fastest_rounds": {
                    k: round(v / fastest[base], 3) for k, v in fastest.items()
                },
                "xla_flops": flops,
                "flops_ratio": {
                    k: round(v / flops[base], 3) if v and flops[base] else None
                    for k, v in flops.items()
                },
                "compile_seconds": {k: round(v, 1) for k, v in compile_seconds.items()},
                "target": {"rts": 1.05},
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
