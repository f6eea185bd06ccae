"""Mesh creation, the logical-axis rules and the shardings derived from them.

Checks that need 8 devices run in a subprocess (this file run as a script) with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, for the reason given in
tests/eight_devices.py: XLA reads the flag once per process, so setting it inside pytest would
depend on test order and leak 8 devices into every other test module.
"""

from __future__ import annotations

import json
import sys

import eight_devices
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from e2s2_jax.training import partitioning


def test_create_mesh_fills_and_names_axes():
    mesh = partitioning.create_mesh()
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}


def test_create_mesh_errors_name_sizes_and_device_count():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"'data': 3.*do not fit 1 devices"):
        partitioning.create_mesh(data=3, devices=devices)
    with pytest.raises(ValueError, match=r"'fsdp': 2.*do not fit 1 devices"):
        partitioning.create_mesh(data=-1, fsdp=2, devices=devices)
    with pytest.raises(ValueError, match="at most one -1"):
        partitioning.create_mesh(data=-1, fsdp=-1, devices=devices)


def test_rules_table_maps_every_model_axis():
    rules = dict(partitioning.LOGICAL_AXIS_RULES)
    assert rules["batch"] == ("data", "fsdp")
    assert rules["embed"] == "fsdp"
    assert rules["mlp"] == rules["heads"] == rules["joined_kv"] == rules["vocab"] == "model"
    for axis in ("kv", "length", "relpos_buckets", "layers"):
        assert rules[axis] is None


def test_fit_spec_replicates_dimensions_the_mesh_does_not_divide():
    mesh = jax.sharding.AbstractMesh((2, 2, 8), ("data", "fsdp", "model"))
    fitted = partitioning._fit_spec(PartitionSpec("fsdp", "model", None), (16, 2, 3), mesh)
    assert fitted == PartitionSpec("fsdp", None, None)
    batch_spec = PartitionSpec(("data", "fsdp"))
    assert partitioning._fit_spec(batch_spec, (8, 5), mesh) == PartitionSpec(("data", "fsdp"), None)
    assert partitioning._fit_spec(batch_spec, (6, 5), mesh) == PartitionSpec(None, None)


def test_optimizer_state_follows_its_parameter():
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    mesh = jax.sharding.AbstractMesh((1, 2, 4), ("data", "fsdp", "model"))
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((8, 12), jnp.float32)}}
    spec = PartitionSpec("fsdp", "model")
    param_shardings = {"dense": {"kernel": NamedSharding(mesh, spec)}}
    opt_state = {
        "count": jax.ShapeDtypeStruct((), jnp.int32),
        "moments": {"dense": {"kernel": jax.ShapeDtypeStruct((8, 12), jnp.float32)}},
        "rows": {"dense": {"kernel": jax.ShapeDtypeStruct((8,), jnp.float32)}},
        "cols": {"dense": {"kernel": jax.ShapeDtypeStruct((12,), jnp.float32)}},
        "other": {"dense": {"kernel": jax.ShapeDtypeStruct((1,), jnp.float32)}},
    }
    got = partitioning.optimizer_state_shardings(opt_state, params, param_shardings, mesh)
    assert got["count"].spec == PartitionSpec()
    assert got["moments"]["dense"]["kernel"].spec == spec
    assert got["rows"]["dense"]["kernel"].spec == PartitionSpec("fsdp")
    assert got["cols"]["dense"]["kernel"].spec == PartitionSpec("model")
    assert got["other"]["dense"]["kernel"].spec == PartitionSpec()


def _worker_shardings() -> dict:
    """Runs in the 8-device subprocess; returns a JSON-able report."""
    import flax.linen as nn
    from jax.sharding import NamedSharding

    from e2s2_jax.models.config import T5Config
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.training import optimizers
    from e2s2_jax.training.train_state import init_train_state

    assert jax.device_count() == 8
    config = T5Config(
        vocab_size=64,
        d_model=16,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        num_encoder_layers=2,
        num_decoder_layers=2,
    )
    model = T5(config)
    report: dict = {"mesh_errors": {}}
    report["mesh_shapes"] = {
        name: dict(partitioning.create_mesh(*sizes).shape)
        for name, sizes in [("fill_data", (-1, 2, 2)), ("fill_model", (2, 1, -1))]
    }
    for name, sizes in [("too_big", (4, 4, 1)), ("no_fill", (3, -1, 1))]:
        try:
            partitioning.create_mesh(*sizes)
            report["mesh_errors"][name] = None
        except ValueError as error:
            report["mesh_errors"][name] = str(error)

    mesh = partitioning.create_mesh(1, 1, 8)
    report["optimizers"] = {}
    for name, optimizer in [
        # min_dim_size_to_factor=8 so the tiny matrices get factored row/column statistics.
        ("adafactor", optimizers.make_optimizer("adafactor", 0.01, min_dim_size_to_factor=8)),
        ("adamw_rms_scaled", optimizers.make_optimizer("adamw_rms_scaled", 0.01)),
    ]:
        state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
        leaves = jax.tree.leaves(state)
        sharding_leaves = jax.tree.leaves(shardings)
        actual = [leaf.sharding for leaf in leaves]
        report["optimizers"][name] = {
            "num_leaves": len(leaves),
            "num_shardings": len(sharding_leaves),
            "all_named": all(isinstance(s, NamedSharding) for s in sharding_leaves),
            "actual_matches_declared": all(
                a.is_equivalent_to(d, leaf.ndim)
                for a, d, leaf in zip(actual, sharding_leaves, leaves, strict=True)
            ),
            "opt_leaves_sharded_over_model": sum(
                "model" in jax.tree.leaves(tuple(s.spec))
                for s in jax.tree.leaves(shardings.opt_state)
            ),
        }
        if name == "adafactor":
            params = state.params
            split = {}
            for path, leaf in jax.tree_util.tree_leaves_with_path(params):
                key = jax.tree_util.keystr(path)
                split[key] = {
                    "spec": [str(entry) for entry in leaf.sharding.spec],
                    "global": list(leaf.shape),
                    "local": list(leaf.addressable_shards[0].data.shape),
                }
            report["params"] = split
            boxed = jax.eval_shape(
                lambda: model.init(
                    jax.random.key(0), jax.numpy.ones((1, 1), int), jax.numpy.ones((1, 1), int)
                )["params"]
            )
            report["logical"] = {
                jax.tree_util.keystr(path): list(spec)
                for path, spec in jax.tree_util.tree_leaves_with_path(
                    nn.get_partition_spec(boxed),
                    is_leaf=lambda x: isinstance(x, PartitionSpec),
                )
            }
            # Sharded init must give the same values as an unsharded init.
            single = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
            reference, _ = init_train_state(model, optimizer, single, jax.random.key(0))
            report["init_max_diff"] = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True)
            )

    # Scanned layers: the stacked 'layers' axis stays whole (lax.scan walks it), the rest
    # follows the same rules. Shapes only: no compilation.
    from dataclasses import replace

    from e2s2_jax.training.train_state import train_state_shardings

    scanned = T5(replace(config, scan_layers=True))
    _, scanned_shardings = train_state_shardings(
        scanned, optimizers.make_optimizer("adamw_rms_scaled", 0.01), mesh
    )
    mlp = scanned_shardings.params["encoder"]["layers"]["mlp"]
    report["scanned_wi_0"] = [str(entry) for entry in mlp["wi_0"]["kernel"].spec]
    report["scanned_adam_mu_wo"] = [
        str(entry)
        for entry in scanned_shardings.opt_state[0]
        .mu["encoder"]["layers"]["mlp"]["wo"]["kernel"]
        .spec
    ]

    batch_mesh = partitioning.create_mesh(2, 2, 2)
    batch = {"encoder_input_tokens": np.zeros((8, 4), np.int32)}
    global_batch = partitioning.make_global_batch(batch, batch_mesh)
    report["batch"] = {
        "spec": [str(e) for e in global_batch["encoder_input_tokens"].sharding.spec],
        "local_rows": global_batch["encoder_input_tokens"].addressable_shards[0].data.shape[0],
        "size": partitioning.check_batch_divisible(batch, batch_mesh, num_microbatches=2),
    }
    try:
        partitioning.check_batch_divisible({"x": np.zeros((6, 4))}, batch_mesh)
        report["batch"]["error"] = None
    except ValueError as error:
        report["batch"]["error"] = str(error)
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    return eight_devices.run_worker(__file__, "shardings")


def test_mesh_sizes_fill_and_errors_on_8_devices(report):
    assert report["mesh_shapes"]["fill_data"] == {"data": 2, "fsdp": 2, "model": 2}
    assert report["mesh_shapes"]["fill_model"] == {"data": 2, "fsdp": 1, "model": 4}
    assert "do not fit 8 devices" in report["mesh_errors"]["too_big"]
    assert "'data': 4, 'fsdp': 4" in report["mesh_errors"]["too_big"]
    assert "8 is not divisible by 3" in report["mesh_errors"]["no_fill"]


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw_rms_scaled"])
def test_every_state_leaf_gets_a_sharding(report, optimizer):
    result = report["optimizers"][optimizer]
    assert result["num_leaves"] == result["num_shardings"]
    assert result["all_named"] and result["actual_matches_declared"]
    # Moments (adam) or factored statistics (adafactor) of vocab/mlp params follow 'model'.
    assert result["opt_leaves_sharded_over_model"] > 0


def test_vocab_and_mlp_params_are_split_over_model(report):
    params, logical = report["params"], report["logical"]
    checked = 0
    for key, axes in logical.items():
        entry = params[key]
        for dim, axis in enumerate(axes):
            if axis in ("vocab", "mlp", "joined_kv"):
                assert entry["spec"][dim] == "model", (key, entry)
                assert entry["local"][dim] * 8 == entry["global"][dim], (key, entry)
                checked += 1
    # wi_0, wi_1, wo per layer; q, k, v, o per attention (3 per decoder layer); embedding;
    # logits.
    assert checked >= 2 * 3 * 2 + (2 + 2 * 2) * 4 + 2
    query = params["['encoder']['layers_0']['attention']['query']['kernel']"]
    assert query["spec"] == ["fsdp", "model"] and query["local"] == [16, 2], query
    # The relative-position table's 2 heads cannot be split 8 ways: replicated, not refused.
    relpos = params["['encoder']['relpos_bias']['rel_embedding']"]
    assert relpos["local"] == relpos["global"] == [32, 2], relpos


def test_scanned_layer_axis_is_not_split(report):
    # [layers, embed, mlp] and [layers, mlp, embed]; fsdp has size 1 on the 1x1x8 mesh.
    assert report["scanned_wi_0"] == ["None", "fsdp", "model"]
    assert report["scanned_adam_mu_wo"] == ["None", "model", "fsdp"]


def test_sharded_init_equals_unsharded_init(report):
    assert report["init_max_diff"] == 0.0


def test_batch_sharding_and_divisibility(report):
    batch = report["batch"]
    assert batch["spec"][0] == "('data', 'fsdp')"
    assert batch["local_rows"] == 2 and batch["size"] == 8
    assert "Batch size 6 is not divisible by 4" in batch["error"]
    assert "Change the batch size to a multiple of 4" in batch["error"]


if __name__ == "__main__":
    workers = {"shardings": _worker_shardings}
    print(json.dumps(workers[sys.argv[1]]()))
