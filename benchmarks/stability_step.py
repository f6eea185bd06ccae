"""Step cost of the training-stability options at a model's shapes: the attention-entropy
diagnostic (`train.attention_entropy_every`) and sigmaReparam (`T5Config.sigma_reparam`).
Prints one JSON object.

Contenders, each a jitted train step (AdamW, span-corruption loss) compiled before timing, on
one synthetic batch of full rows, taking turns within each of `--rounds` rounds (each round
starting one contender later, so that load from other processes on a shared machine falls on
all alike):
- `plain`: the step as it is without either option;
- `entropy_every_1000`: `--steps` steps chosen as the trainer chooses them with
  `attention_entropy_every=1000` (step s runs the entropy program when s % 1000 == 0): within a
  round of fewer than 1000 steps, the plain program only. Its ratio to `plain` is the timing
  noise, since it is the same program;
- `entropy_every_1`: every step the entropy program (the setting's most expensive use);
- `sigma_reparam`: the plain step of the model with `T5Config.sigma_reparam = True` (one
  power-iteration step per reparametrised kernel, and W_hat = gamma / sigma * W, forward and
  backward).

  PYTHONPATH=. python benchmarks/stability_step.py --model_gin gin/models/t5_1_1_tiny.gin
  PYTHONPATH=. python benchmarks/stability_step.py --model_gin gin/models/t5_1_1_small.gin \
      --batch_size 8 --inputs_length 512 --targets_length 114 --steps 1 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks._common import (  # noqa: E402
    alternate,
    host_malloc,
    load_model,
    retain_freed_host_memory,
    summary,
)
from benchmarks.e2s2_step import synthetic_batch  # noqa: E402

CONTENDERS = ("plain", "entropy_every_1000", "entropy_every_1", "sigma_reparam")


def _cost(compiled) -> dict:
    """XLA's own count of a compiled program's FLOPs and bytes accessed: independent of the
    machine's load, where the timings on shared cores are not."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return {
        "flops": float(analysis.get("flops", 0.0)),
        "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
    }


class Steps:
    """A model's train state and its compiled plain and entropy steps, on a fixed batch."""

    def __init__(self, model, batch: dict, entropy: bool):
        from e2s2_jax.objectives import Seq2SeqObjective
        from e2s2_jax.training import partitioning
        from e2s2_jax.training.train_state import init_train_state
        from e2s2_jax.training.train_step import make_train_step

        optimizer = optax.adamw(1e-4)
        mesh = partitioning.create_mesh(devices=jax.devices()[:1])
        self.state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
        self.batch = partitioning.make_global_batch(batch, mesh)
        self.rng = jax.random.key(1)
        self.compile_seconds = {}
        self.costs = {}
        self.programs = {}
        for name, with_entropy in (("plain", False), ("entropy", True))[: 2 if entropy else 1]:
            step = make_train_step(
                model,
                optimizer,
                Seq2SeqObjective(z_loss=0.0),
                mesh,
                state_shardings=shardings,
                attention_entropy=with_entropy,
            )
            start = time.perf_counter()
            self.programs[name] = step.lower(self.state, self.batch, self.rng).compile()
            self.compile_seconds[name] = round(time.perf_counter() - start, 1)
            self.costs[name] = _cost(self.programs[name])
        self.step = 0

    def run(self, steps: int, entropy_every: int = 0) -> None:
        for _ in range(steps):
            self.step += 1
            entropy = entropy_every and self.step % entropy_every == 0
            program = self.programs["entropy" if entropy else "plain"]
            self.state, metrics = program(self.state, self.batch, self.rng)
        jax.block_until_ready(metrics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_tiny.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="steps per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--cost_only", action="store_true", help="compile and report XLA's costs, no timing"
    )
    args = parser.parse_args(argv)
    contenders = args.contenders.split(",")
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {CONTENDERS}")

    model = load_model([args.model_gin])
    config = model.config
    batch = synthetic_batch(
        0, args.batch_size, args.inputs_length, args.targets_length, config.vocab_size
    )
    plain = Steps(model, batch, entropy=any(c.startswith("entropy") for c in contenders))
    fns = {}
    if "plain" in contenders:
        fns["plain"] = lambda: plain.run(args.steps)
    if "entropy_every_1000" in contenders:
        fns["entropy_every_1000"] = lambda: plain.run(args.steps, entropy_every=1000)
    if "entropy_every_1" in contenders:
        fns["entropy_every_1"] = lambda: plain.run(args.steps, entropy_every=1)
    compile_seconds = dict(plain.compile_seconds)
    costs = dict(plain.costs)
    if "sigma_reparam" in contenders:
        reparam_model = model.clone(config=dataclasses.replace(config, sigma_reparam=True))
        reparam = Steps(reparam_model, batch, entropy=False)
        compile_seconds["sigma_reparam"] = reparam.compile_seconds["plain"]
        costs["sigma_reparam"] = reparam.costs["plain"]
        fns["sigma_reparam"] = lambda: reparam.run(args.steps)
    for name, cost in costs.items():
        if name != "plain":
            cost["flops_vs_plain"] = round(cost["flops"] / costs["plain"]["flops"], 4)
            cost["bytes_vs_plain"] = round(
                cost["bytes_accessed"] / costs["plain"]["bytes_accessed"], 4
            )
    results = {}
    if not args.cost_only:
        for fn in fns.values():  # one untimed warm-up call each
            fn()
        seconds = alternate(fns, args.rounds, rotate=True)
        per_step = {name: [s / args.steps for s in values] for name, values in seconds.items()}
        results = {name: summary(values) for name, values in per_step.items()}
    if "plain" in results:
        base = results["plain"]["median_s"]
        for name in results:
            results[name]["vs_plain"] = round(results[name]["median_s"] / base, 3)
    print(
        json.dumps(
            {
                "model_gin": args.model_gin,
                "shapes": {
                    "batch": args.batch_size,
                    "inputs": args.inputs_length,
                    "targets": args.targets_length,
                },
                "steps_per_round": args.steps,
                "rounds": args.rounds,
                "seconds_per_step": results,
                "compile_seconds": compile_seconds,
                "xla_cost": costs,
                "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind,
                "cpu_count": os.cpu_count(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "host_malloc": host_malloc(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    retain_freed_host_memory()
    main()
