"""Throughput of the pretraining data chains (span corruption, E2S2) on one CPU core; prints JSON.

One core: the process is pinned to a single CPU (os.sched_setaffinity) and TensorFlow runs with
one intra-op and one inter-op thread and a tf.data private thread pool of size 1
(options.threading.private_threadpool_size = 1, max_intra_op_parallelism = 1), so map calls,
prefetching and the ops inside them share that core.

    python benchmarks/data_pipeline.py [--examples 1500] [--rounds 3] [--pack]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHAINS = {"span_corruption": "bundled_span_corruption", "e2s2": "bundled_e2s2"}


def pin_to_one_core() -> int | None:
    """Pins this process to one CPU; returns it (None where the OS has no affinity call)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def one_core_options():
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = True
    return options


def make_dataset(task_name: str, lengths: dict[str, int], pack: bool, seed: int):
    """The Task's dataset (source, tokenize, split, objective, eos), optionally packed."""
    import seqio

    from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter

    task = seqio.get_mixture_or_task(task_name)
    dataset = task.get_dataset(lengths, split="train", shuffle=False, seed=seed, num_epochs=None)
    if pack:
        dataset = E2S2EncDecFeatureConverter(pack=True)(dataset, lengths)
    return dataset.with_options(one_core_options())


def measure(task_name: str, lengths: dict[str, int], pack: bool, examples: int, seed: int):
    """Returns examples/s, input tokens/s (non-pad encoder inputs) and target tokens/s."""
    import numpy as np

    iterator = make_dataset(task_name, lengths, pack, seed).as_numpy_iterator()
    input_key, target_key = (
        ("encoder_input_tokens", "decoder_target_tokens") if pack else ("inputs", "targets")
    )
    for _ in range(50):  # warm-up: tracing, the first shuffle-free fill of buffers
        next(iterator)
    input_tokens = target_tokens = 0
    start = time.perf_counter()
    for _ in range(examples):
        example = next(iterator)
        input_tokens += int(np.count_nonzero(example[input_key]))
        target_tokens += int(np.count_nonzero(example[target_key]))
    seconds = time.perf_counter() - start
    return {
        "examples_per_s": examples / seconds,
        "input_tokens_per_s": input_tokens / seconds,
        "target_tokens_per_s": target_tokens / seconds,
        "mean_input_tokens": input_tokens / examples,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1500, help="timed examples per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per chain")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--pack", action="store_true", help="include the packing converter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cpu = pin_to_one_core()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tasks  # noqa: F401  (registers the bundled tasks)

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    rounds: dict[str, list[dict]] = {chain: [] for chain in CHAINS}
    for _ in range(args.rounds):  # alternate the chains so machine noise hits both alike
        for chain, task_name in CHAINS.items():
            rounds[chain].append(measure(task_name, lengths, args.pack, args.examples, args.seed))

    results = {}
    for chain, measured in rounds.items():
        results[chain] = {
            key: round(statistics.median(m[key] for m in measured), 1) for key in measured[0]
        }
        results[chain]["rounds_input_tokens_per_s"] = [
            round(m["input_tokens_per_s"]) for m in measured
        ]
    e2s2_vs_span = results["e2s2"]["examples_per_s"] / results["span_corruption"]["examples_per_s"]
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "cpu_pinned": cpu,
                "threads": "1 intra-op, 1 inter-op, tf.data private pool 1",
                "lengths": lengths,
                "packed": args.pack,
                "examples_per_round": args.examples,
                "rounds": args.rounds,
                "machine": platform.processor() or platform.machine(),
                "tensorflow": tf.__version__,
                "chains": results,
                "e2s2_speed_vs_span_corruption": round(e2s2_vs_span, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
