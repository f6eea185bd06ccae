"""One process of the multi-process test (`tests/test_distributed.py`); also the reference.

    python tests/distributed_worker.py --num_processes 2 --process_id I --port P --out F
    python tests/distributed_worker.py --num_processes 1 --out F      (the reference)

Both read the bundled span-corruption task split into 2 SeqIO shards, as two hosts do: a host
reads its own shard; the one-process reference reads both and puts shard 0's rows before shard
1's, which is the global batch `make_global_batch` assembles from two hosts. Each process has
2 CPU devices (4 in the reference), so the mesh is 4-way data parallel either way. Writes the
loss of each step as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import eight_devices

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STEPS = 4
BATCH_SIZE = 8
LENGTHS = {"inputs": 64, "targets": 16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    devices_per_process = 4 // args.num_processes
    os.environ["XLA_FLAGS"] = eight_devices.xla_flags(devices_per_process)

    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    import numpy as np

    from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter
    from e2s2_jax.models.config import T5Config
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import Seq2SeqObjective
    from e2s2_jax.training import optimizers, partitioning
    from e2s2_jax.training.input_pipeline import get_dataset
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    assert jax.device_count() == 4, jax.devices()

    def shard_batches(index):
        dataset = get_dataset(
            "bundled_span_corruption",
            LENGTHS,
            "train",
            BATCH_SIZE,
            E2S2EncDecFeatureConverter(pack=True),
            shuffle=True,
            seed=0,
            num_epochs=None,
            shard=(index, 2),
        )
        return dataset.as_numpy_iterator()

    if args.num_processes > 1:
        local = shard_batches(args.process_id)
        next_local = lambda: next(local)  # noqa: E731
    else:
        shards = [shard_batches(0), shard_batches(1)]

        def next_local():
            parts = [next(shard) for shard in shards]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    config = T5Config(
        vocab_size=8192,
        d_model=32,
        d_ff=64,
        num_heads=2,
        d_kv=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
    )
    model = T5(config)
    mesh = partitioning.create_mesh(-1, 1, 1)
    optimizer = optimizers.make_optimizer("adamw_rms_scaled", 1e-2, gradient_clip_norm=1.0)
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = make_train_step(model, optimizer, Seq2SeqObjective(), mesh, state_shardings=shardings)
    losses = []
    for _ in range(STEPS):
        batch = partitioning.make_global_batch(next_local(), mesh)
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    checksum = float(
        sum(jax.tree.leaves(jax.tree.map(lambda x: x.astype("float32").sum(), state.params)))
    )
    with open(args.out, "w") as f:
        json.dump(
            {"losses": losses, "param_sum": checksum, "process_count": jax.process_count()}, f
        )


if __name__ == "__main__":
    main()
