"""Train-step throughput: this project's jitted step against Hugging Face `transformers`'
PyTorch `T5ForConditionalGeneration` + `torch.optim.AdamW` on the same weights and batch, and
the step time of each pretraining objective relative to span corruption. Prints one JSON object.

What is timed: a full training step (forward, backward, AdamW update) on one synthetic batch of
full rows (no padding, so tokens/s counts `batch x (inputs + targets)` non-pad tokens). Ours:
`make_train_step` with `optax.adamw`, `Seq2SeqObjective(z_loss=0)`, compiled before timing
(compile seconds reported). Theirs: the model `export_hf` wrote from our initial params, in
train mode with dropout 0 (as ours), `torch.optim.AdamW` with the same hyper-parameters and as
many torch threads as this process has CPUs; untimed warm-up steps (two of ours, one of
torch's). The first-step losses of the two are compared (same weights, same batch: they must
agree). Contenders alternate
within each of `--rounds` rounds of `--steps` steps, each round starting one contender later
(a JAX step run right after a torch step is slowed by it); medians, spread and every round are
reported.

Objective ratios (our step only, same model sizes and batch, AdamW): span corruption, E2S2 with
two views (the defaults) and one view, SurfaceFusion (hard mode), and SSR. SSR's train step is
span corruption's (seq2seq cross-entropy on SSR records of the same shapes): it is compiled and
timed again as its own contender, so its ratio doubles as a measure of the timing noise.

Peak memory (`--contenders ...,rss`): each contender runs in a child process of its own (our
span-corruption step, or transformers' step, 2 steps each), since one process holding both
would mix them; reported are the RSS after set-up and the peak RSS during the steps (Linux
/proc/self/status, with the peak mark reset between the two), both including the Python and
library runtime.

MFU: model FLOPs per step come from `e2s2_jax.training.flops` (6N + attention, the matmuls of
the batch's shapes); MFU is reported when the device's peak FLOP/s is in
`training/metrics_writer.py` (none for CPUs: achieved model FLOP/s is reported instead).

  PYTHONPATH=. python benchmarks/train_step.py --model_gin gin/models/t5_1_1_tiny.gin
  PYTHONPATH=. python benchmarks/train_step.py --model_gin gin/models/t5_1_1_small.gin \
      --steps 2 --rounds 3
  # on an accelerator (no TensorFlow or SeqIO there, and none needed; gin-config, pure Python,
  # travels as a wheel): ours only, bfloat16 activations, MFU where the device's peak is known
  PYTHONPATH=. python benchmarks/train_step.py --model_gin gin/models/t5_1_1_base.gin \
      --contenders ours --dtype bfloat16 --batch_size 64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks._common import alternate, load_model, summary  # noqa: E402
from benchmarks.e2s2_step import synthetic_batch  # noqa: E402

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
OBJECTIVES = ("span_corruption", "e2s2_two_views", "e2s2_one_view", "surface_fusion", "ssr")


def _log(message: str) -> None:
    print(f"[train_step] {message}", file=sys.stderr, flush=True)


def _proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux: VmRSS now, VmHWM peak), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def objective_setting(name: str, model):
    """`(model, objective)` of one objective on the sizes of `model` (a plain T5)."""
    from e2s2_jax.models.fusion import SurfaceFusion
    from e2s2_jax.models.heads import DenoisingHead
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import E2S2Objective, Seq2SeqObjective

    config = model.config
    with_head = T5(config, encoder_heads=(("denoise", DenoisingHead),))
    return {
        "span_corruption": lambda: (model, Seq2SeqObjective(z_loss=0.0)),
        "ssr": lambda: (model, Seq2SeqObjective(z_loss=0.0)),
        "e2s2_two_views": lambda: (with_head, E2S2Objective(z_loss=0.0)),
        "e2s2_one_view": lambda: (
            with_head,
            E2S2Objective(
                nll_noised_weight=1.0, nll_masked_weight=0.0, contrast_weight=0.0, z_loss=0.0
            ),
        ),
        "surface_fusion": lambda: (
            T5(config, output_layer_factory=functools.partial(SurfaceFusion, mode="hard")),
            Seq2SeqObjective(z_loss=0.0),
        ),
    }[name]()


class OursStep:
    """Our jitted step on a fixed batch; `run(n)` takes n steps and blocks on the result."""

    def __init__(self, model, objective, batch: dict, seed: int = 0):
        from e2s2_jax.training import partitioning
        from e2s2_jax.training.train_state import init_train_state
        from e2s2_jax.training.train_step import make_train_step

        self.optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        mesh = partitioning.create_mesh(devices=jax.devices()[:1])
        self.state, shardings = init_train_state(model, self.optimizer, mesh, jax.random.key(seed))
        self.initial_params = jax.device_get(self.state.params)
        self.batch = partitioning.make_global_batch(batch, mesh)
        step = make_train_step(model, self.optimizer, objective, mesh, state_shardings=shardings)
        start = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch, jax.random.key(1)).compile()
        self.compile_seconds = time.perf_counter() - start
        self.first_loss = None

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch, jax.random.key(1))
        metrics = jax.device_get(metrics)
        if self.first_loss is None:
            self.first_loss = float(metrics["loss"])


class HFStep:
    """transformers' T5 + torch AdamW on the same batch; `run(n)` takes n steps."""

    def __init__(self, config, params, batch: dict, threads: int):
        import torch

        from benchmarks._common import hf_model_from_params

        torch.set_num_threads(threads)
        self.model = hf_model_from_params(config, params).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
        tensor = functools.partial(torch.as_tensor, dtype=torch.long)
        self.inputs = {
            "input_ids": tensor(batch["encoder_input_tokens"]),
            "decoder_input_ids": tensor(batch["decoder_input_tokens"]),
            "labels": tensor(batch["decoder_target_tokens"]),
        }
        self.first_loss = None

    def run(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(**self.inputs).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.first_loss is None:
                self.first_loss = float(loss.detach())


def _rss_probe(args) -> None:
    """Child-process mode: set up one contender, reset the peak-RSS mark, take 2 steps, print
    JSON: RSS after set-up (imports, params, and for ours the compiled step) and the peak
    during the steps."""
    model = load_model([args.model_gin], args.bindings)
    batch = _batch(args, model.config)
    if args.rss_probe == "ours":
        runner = OursStep(model, objective_setting("span_corruption", model)[1], batch)
    else:
        tokens = batch["encoder_input_tokens"][:1], batch["decoder_input_tokens"][:1]
        params = jax.jit(model.init)(jax.random.key(0), *tokens)["params"]
        runner = HFStep(model.config, params, batch, os.cpu_count() or 1)
        del params
    setup_peak = _proc_status_mib("VmHWM")
    baseline = _proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    runner.run(2)
    result = {
        "setup_peak_rss_mib": round(setup_peak, 1),
        "rss_before_steps_mib": round(baseline, 1),
        "peak_rss_during_steps_mib": round(_proc_status_mib("VmHWM"), 1),
    }
    print(json.dumps(result))


def _measure_rss(contender: str, argv: list[str]) -> dict | None:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--rss_probe", contender],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        _log(f"RSS probe for {contender} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _batch(args, config) -> dict:
    return synthetic_batch(
        0, args.batch_size, args.inputs_length, args.targets_length, config.vocab_size
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_gin", default="gin/models/t5_1_1_tiny.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and contender")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="activation dtype (params float32)")
    parser.add_argument(
        "--contenders", default="ours,hf,objectives", help="any of ours, hf, objectives, rss"
    )
    parser.add_argument("--rss_probe", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.bindings = [f"ACTIVATION_DTYPE = '{args.dtype}'"]
    if args.rss_probe:
        return _rss_probe(args)
    contenders = set(args.contenders.split(","))

    from e2s2_jax.training import flops
    from e2s2_jax.training.metrics_writer import peak_flops

    model = load_model([args.model_gin], args.bindings)
    config = model.config
    batch = _batch(args, config)
    tokens_per_step = args.batch_size * (args.inputs_length + args.targets_length)
    model_flops = flops.step_flops(
        config, args.batch_size, args.inputs_length, args.targets_length
    ).train
    peak = peak_flops(jax.devices()[:1])

    runners: dict = {}
    compile_seconds: dict = {}
    names = ["span_corruption"] if "ours" in contenders or "hf" in contenders else []
    if "objectives" in contenders:
        names = list(OBJECTIVES)
    for name in names:
        _log(f"compiling {name}")
        runner = OursStep(*objective_setting(name, model), batch)
        compile_seconds[name] = round(runner.compile_seconds, 2)
        # Two warm-up steps: with the retained heap, a program's second step is the one that
        # grows it to its peak (20-30 s at T5-small, against about 6 s for every later step).
        # Two calls, not run(2): the first call records the first step's loss.
        runner.run(1)
        runner.run(1)
        runners[name] = runner
    if "hf" in contenders:
        _log("loading the same weights into transformers")
        threads = os.cpu_count() or 1
        runners["hf"] = HFStep(config, runners["span_corruption"].initial_params, batch, threads)
        start = time.perf_counter()
        runners["hf"].run(1)  # warm-up
        compile_seconds["hf_first_step"] = round(time.perf_counter() - start, 2)

    _log(f"timing {list(runners)}: {args.rounds} rounds of {args.steps} steps")
    seconds = alternate(
        {name: functools.partial(r.run, args.steps) for name, r in runners.items()},
        args.rounds,
        rotate=True,
    )
    per_step = {name: [s / args.steps for s in rounds] for name, rounds in seconds.items()}
    report: dict = {
        "benchmark": "train_step",
        "model_gin": args.model_gin,
        "parameters": int(
            sum(x.size for x in jax.tree.leaves(runners["span_corruption"].initial_params))
        )
        if runners
        else None,
        "batch_size": args.batch_size,
        "inputs_length": args.inputs_length,
        "targets_length": args.targets_length,
        "activation_dtype": args.dtype,
        "steps_per_round": args.steps,
        "tokens_per_step": tokens_per_step,
        "model_flops_per_step": model_flops,
        "model_flops_per_token": model_flops / tokens_per_step,
        "seconds_per_step": {name: summary(v) for name, v in per_step.items()},
        "tokens_per_second": {
            name: round(tokens_per_step / summary(v)["median_s"], 1) for name, v in per_step.items()
        },
        "model_tflops_per_second": {
            name: round(model_flops / summary(v)["median_s"] / 1e12, 4)
            for name, v in per_step.items()
            if name in ("span_corruption", "hf")
        },
        "compile_seconds": compile_seconds,
    }
    if peak:
        report["mfu"] = {
            name: round(model_flops / summary(v)["median_s"] / peak, 4)
            for name, v in per_step.items()
            if name in ("span_corruption", "hf")
        }
    if "hf" in runners:
        ours, hf = runners["span_corruption"], runners["hf"]
        report["first_step_loss"] = {"ours": ours.first_loss, "hf": hf.first_loss}
        report["first_step_loss_abs_diff"] = abs(ours.first_loss - hf.first_loss)
        report["speedup_vs_hf"] = {
            "median": round(
                summary(per_step["hf"])["median_s"]
                / summary(per_step["span_corruption"])["median_s"],
                3,
            ),
            "per_round": [
                round(h / o, 3)
                for h, o in zip(per_step["hf"], per_step["span_corruption"], strict=True)
            ],
        }
        report["target_speedup_vs_hf"] = 1.5
    if "objectives" in contenders:
        base = per_step["span_corruption"]
        report["objective_step_ratio"] = {
            name: {
                "median": round(summary(per_step[name])["median_s"] / summary(base)["median_s"], 3),
                "per_round": [round(a / b, 3) for a, b in zip(per_step[name], base, strict=True)],
            }
            for name in OBJECTIVES
        }
    if "rss" in contenders:
        _log("peak RSS probes (child processes)")
        report["memory"] = {c: _measure_rss(c, argv) for c in ("ours", "hf")}
    from benchmarks._common import environment, host_malloc

    report["environment"] = (
        environment(os.cpu_count() or 1)
        if "hf" in contenders
        else {
            "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "host_malloc": host_malloc(),
        }
    )
    report["environment"]["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    from benchmarks._common import retain_freed_host_memory

    retain_freed_host_memory()
    main()
