"""The encoder-side terms of RTS / C-RTS (2-way replaced-token head), SLM (vocabulary head on
swapped positions) and the same-document task (3-way pair head on the mean pool) in
`E2S2Objective`: every term against NumPy, rows without a second view or a pair adding no such
term (masked means, also E2S2's contrastive term), the SLM position budget,
gradient accumulation, 8 simulated devices, the Gin files, and the heads' export.

The 8-device part runs in a subprocess (this file as a script), as tests/test_train_step.py
explains.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import eight_devices
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale
from test_e2s2_objective import (
    _train_once,
    evaluate,
    init_params,
    numpy_log_softmax,
    pack,
    random_example,
)
from test_heads import numpy_segment_pool
from test_nt_xent import numpy_nt_xent
from test_train_step import tiny_config

from e2s2_jax.data import view_labels
from e2s2_jax.models import heads
from e2s2_jax.models.t5 import T5
from e2s2_jax.objectives import E2S2Objective, first_positions, mode_count

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
ENCODER_LENGTH, DECODER_LENGTH = 12, 6
ENCODER_TERMS = dict(
    nll_noised_weight=1.0,
    nll_masked_weight=0.0,
    denoise_weight=0.7,
    contrast_weight=0.0,
    slm_weight=0.4,
    same_document_weight=0.3,
    denoise_head="rts",
    replaced_label=view_labels.SWAP_REPLACED,
    z_loss=1e-3,
)


def swap_model() -> T5:
    """test_train_step's tiny T5 with RTS's 2-way head (no dropout: comparisons across
    microbatchings need the same masks), SLM's head and the same-document pair head."""
    rts = functools.partial(heads.DenoisingHead, num_classes=2, dropout_rate=0.0)
    pair = functools.partial(heads.SameDocumentHead, dropout_rate=0.0)
    return T5(
        tiny_config(),
        encoder_heads=(("rts", rts), ("slm", heads.SLMHead), ("same_document", pair)),
    )


def swap_example(rng, encoder_length: int, decoder_length: int, with_view: bool = True):
    """One example of the swapped view: 25% of the tokens replaced by other ids (label 1); or,
    without a view, a copy labelled NO_SECOND_VIEW. Its pair label is one of the three
    same-document classes, or NO_PAIR (a quarter of the examples)."""
    masked = rng.integers(2, VOCAB, encoder_length).astype(np.int32)
    noised, labels = masked.copy(), np.zeros(encoder_length, np.int32)
    if with_view:
        replaced = rng.random(encoder_length) < 0.25
        noised[replaced] = (masked[replaced] - 2 + rng.integers(1, VOCAB - 2, replaced.sum())) % (
            VOCAB - 2
        ) + 2
        labels[replaced] = view_labels.SWAP_REPLACED
    else:
        labels[:] = view_labels.NO_SECOND_VIEW
    targets = rng.integers(2, VOCAB, decoder_length).astype(np.int32)
    pair = int(rng.integers(4))  # 0, 1, 2 or NO_PAIR (3)
    example = {"masked": masked, "noised": noised, "labels": labels, "targets": targets}
    return {**example, "pair": pair}


def mixed_batch(seed: int, batch_size: int = 8, packed: bool = False) -> dict[str, np.ndarray]:
    """Rows with the swapped view and rows without one (a mixture); packed rows mix both."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in range(batch_size):
        count = int(rng.integers(1, 4)) if packed else 1
        longest = ENCODER_LENGTH // count
        rows.append(
            [
                swap_example(
                    rng,
                    int(rng.integers(3, longest + 1)),
                    int(rng.integers(1, DECODER_LENGTH // count + 1)),
                    with_view=(row + i) % 3 != 0,
                )
                for i in range(count)
            ]
        )
    batch = pack(rows, ENCODER_LENGTH, DECODER_LENGTH)
    if not packed:
        batch = {k: v for k, v in batch.items() if "segment" not in k and "positions" not in k}
    return batch


def numpy_cross_entropy(logits, targets, weights):
    """(mean loss, accuracy) over the weighted positions, float64."""
    log_probs, _ = numpy_log_softmax(logits)
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    correct = np.argmax(np.asarray(logits), -1) == targets
    return np.sum(nll * weights) / weights.sum(), np.sum(correct * weights) / weights.sum()


def test_rts_and_slm_terms_match_numpy_and_skip_rows_without_a_view():
    model = swap_model()
    params = init_params(model)
    batch = mixed_batch(0)
    objective = E2S2Objective(**ENCODER_TERMS)
    loss, metrics = evaluate(objective, model, params, batch)

    def apply_on(view: str):  # the model on one view's tokens, as a plain pass
        return model.apply(
            {"params": params},
            batch[view],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            return_intermediates=True,
        )

    logits, intermediates = apply_on("encoder_input_tokens_noised")
    labels = batch["encoder_noise_labels"]
    has_view = labels != view_labels.NO_SECOND_VIEW
    assert has_view.any() and (~has_view & (batch["encoder_input_tokens"] != 0)).any()
    positions = (batch["encoder_input_tokens_noised"] != 0) & has_view  # the masked mean's mask
    reference = {}
    weights = batch["decoder_loss_weights"].astype(np.float64)
    log_probs, log_z = numpy_log_softmax(logits)
    token_nll = -np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)
    reference["nll_noised"] = np.sum(token_nll[..., 0] * weights) / weights.sum()
    reference["z_loss"] = np.sum(1e-3 * log_z**2 * weights) / weights.sum()
    reference["rts_loss"], reference["rts_accuracy"] = numpy_cross_entropy(
        np.asarray(intermediates["heads"]["rts"]), np.where(has_view, labels, 0), positions
    )
    reference["rts_majority_rate"] = np.mean(labels[positions] == 0)
    # SLM: the original (view M) token at the replaced positions of rows with a view.
    slm = intermediates["heads"]["slm"]
    hidden = np.asarray(slm.hidden, np.float64)
    vocab_logits = hidden @ np.asarray(slm.embedding, np.float64).T / np.sqrt(hidden.shape[-1])
    vocab_logits += np.asarray(slm.bias, np.float64)
    swapped = positions & (labels == view_labels.SWAP_REPLACED)
    reference["slm_loss"], reference["slm_accuracy"] = numpy_cross_entropy(
        vocab_logits, batch["encoder_input_tokens"], swapped
    )
    originals = batch["encoder_input_tokens"][swapped]
    reference["slm_majority_rate"] = np.bincount(originals).max() / len(originals)
    # Same-document: the pair head on view M, averaged over each row's (one example's)
    # non-pad positions, for the rows with a pair.
    _, plain = apply_on("encoder_input_tokens")
    pair_logits = np.asarray(plain["heads"]["same_document"], np.float64)
    pairs = batch["encoder_pair_labels"][:, 0]
    has_pair = pairs != view_labels.NO_PAIR
    assert has_pair.any() and not has_pair.all()
    present = batch["encoder_input_tokens"] != 0
    pooled = np.stack([pair_logits[row, present[row]].mean(axis=0) for row in range(len(pairs))])
    reference["same_document_loss"], reference["same_document_accuracy"] = numpy_cross_entropy(
        pooled, np.where(has_pair, pairs, 0), has_pair.astype(np.float64)
    )
    reference["same_document_majority_rate"] = np.bincount(pairs[has_pair]).max() / has_pair.sum()
    reference["loss"] = (
        reference["nll_noised"]
        + reference["z_loss"]
        + 0.7 * reference["rts_loss"]
        + 0.4 * reference["slm_loss"]
        + 0.3 * reference["same_document_loss"]
    )
    # Float32 model outputs against float64 NumPy of the same outputs: the softmax sums a few
    # dozen terms (64 classes at most), so 64 roundings of the scale is generous.
    for name, value in reference.items():
        assert_close_to_scale(metrics[name], value, ulps=64, err_msg=name)
    assert loss == metrics["loss"]
    normalizers = objective.normalizers({k: jnp.asarray(v) for k, v in batch.items()})
    assert float(normalizers["rts_weight_sum"]) == positions.sum()
    assert float(normalizers["slm_weight_sum"]) == swapped.sum()
    assert float(normalizers["slm_majority_count"]) == np.bincount(originals).max()
    assert float(normalizers["same_document_weight_sum"]) == has_pair.sum()

    # The SLM logits of the first K swapped positions per row only: all kept when K covers
    # every row's count (the same terms), the rest counted when it does not.
    widest = int(swapped.sum(axis=1).max())
    _, budget = evaluate(
        E2S2Objective(**ENCODER_TERMS, slm_positions_per_row=widest), model, params, batch
    )
    for name in ("slm_loss", "slm_accuracy", "loss"):
        np.testing.assert_allclose(budget[name], metrics[name], rtol=1e-5, err_msg=name)
    assert budget["slm_dropped_positions"] == 0
    _, one = evaluate(E2S2Objective(**ENCODER_TERMS, slm_positions_per_row=1), model, params, batch)
    assert one["slm_dropped_positions"] == swapped.sum() - np.sum(swapped.any(axis=1))


def test_first_positions_and_mode_count_against_numpy():
    rng = np.random.default_rng(2)
    selected = rng.random((5, 11)) < 0.3
    positions, valid = first_positions(jnp.asarray(selected), 3)
    for row in range(5):
        expected = np.flatnonzero(selected[row])[:3]
        np.testing.assert_array_equal(np.asarray(positions[row])[np.asarray(valid[row])], expected)
    values = rng.integers(1, 6, (4, 9))
    weights = rng.random((4, 9)) < 0.5
    assert (
        float(mode_count(jnp.asarray(values), jnp.asarray(weights)))
        == np.bincount(values[weights]).max()
    )


def test_e2s2_terms_count_only_rows_with_a_second_view():
    """A mixture of span corruption (no second view) and E2S2: the denoising and contrastive
    terms are the masked means over the rows with a view, as if the others were absent."""
    rng = np.random.default_rng(7)
    examples = [random_example(rng, int(rng.integers(3, 5)), 2) for _ in range(12)]
    for example in examples[::3]:  # every third example has no second view
        example["noised"] = example["masked"].copy()
        example["labels"][:] = view_labels.NO_SECOND_VIEW
    rows = [examples[i : i + 3] for i in range(0, 12, 3)]
    batch = pack(rows, ENCODER_LENGTH, DECODER_LENGTH)
    with_view = pack(
        [[e for e in row if e["labels"][0] != view_labels.NO_SECOND_VIEW] for row in rows],
        ENCODER_LENGTH,
        DECODER_LENGTH,
    )
    denoise = functools.partial(heads.DenoisingHead, dropout_rate=0.0)
    model = T5(tiny_config(), encoder_heads=(("denoise", denoise),))
    params = init_params(model)
    objective = E2S2Objective(temperature=0.5, nll_masked_weight=0.0, nll_noised_weight=0.0)
    _, mixed = evaluate(objective, model, params, batch)
    _, alone = evaluate(objective, model, params, with_view)
    for name in ("denoise_loss", "denoise_accuracy", "denoise_majority_rate", "contrast_loss"):
        np.testing.assert_allclose(mixed[name], alone[name], rtol=2e-5, err_msg=name)
    normalizers = objective.normalizers({k: jnp.asarray(v) for k, v in batch.items()})
    assert float(normalizers["contrast_anchor_count"]) == 2 * 8
    assert float(normalizers["denoise_weight_sum"]) == np.sum(
        with_view["encoder_input_tokens"] != 0
    )
    # And against NumPy: the contrastive loss over the pooled segments that have a view.
    encoded = {}
    for view in ("encoder_input_tokens_noised", "encoder_input_tokens"):
        _, intermediates = model.apply(
            {"params": params},
            batch[view],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            batch["encoder_segment_ids"],
            batch["decoder_segment_ids"],
            return_intermediates=True,
        )
        mask = (batch[view] != 0) & (batch["encoder_noise_labels"] != view_labels.NO_SECOND_VIEW)
        encoded[view], valid = numpy_segment_pool(
            np.asarray(intermediates["encoder"].encoded), mask, batch["encoder_segment_ids"], 8
        )
    loss_sum, _, anchors = numpy_nt_xent(
        encoded["encoder_input_tokens_noised"].reshape(-1, 16),
        encoded["encoder_input_tokens"].reshape(-1, 16),
        valid.reshape(-1),
        temperature=0.5,
    )
    np.testing.assert_allclose(mixed["contrast_loss"], loss_sum / anchors, rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
    import optax

    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state

    model = swap_model()
    sgd = optax.sgd(1.0)
    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial_state = jax.device_get(init_train_state(model, sgd, mesh, jax.random.key(3))[0])
    batch = mixed_batch(4, batch_size=8, packed=True)
    objective = E2S2Objective(**ENCODER_TERMS)
    full_grads, full = _train_once(model, sgd, objective, mesh, batch, initial_state)
    micro_grads, micro = _train_once(model, sgd, objective, mesh, batch, initial_state, 4)
    for name in full:
        if name not in ("grad_norm", "nonfinite"):
            np.testing.assert_allclose(micro[name], full[name], rtol=1e-5, err_msg=name)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(full_grads))
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(micro_grads), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5 * largest)
    # Both heads and the tied embedding are trained by their terms.
    assert np.abs(full_grads["head_rts"]["kernel"]).max() > 0
    assert np.abs(full_grads["head_slm"]["bias"]).max() > 0
    assert np.abs(full_grads["head_same_document"]["kernel"]).max() > 0


# ----------------------------------------------------------------------------- 8 devices


def _worker_sharded() -> dict:
    """Runs in the 8-device subprocess: the RTS + SLM + same-document step on 1 device and two
    8-device meshes; returns each one's metrics and the largest gradient difference from one."""
    import optax

    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state

    assert jax.device_count() == 8, jax.devices()
    model = swap_model()
    sgd = optax.sgd(0.1)
    single = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial_state = jax.device_get(init_train_state(model, sgd, single, jax.random.key(0))[0])
    batch = mixed_batch(6, batch_size=16, packed=True)
    objective = E2S2Objective(**ENCODER_TERMS)
    report, grads = {}, {}
    for name, mesh in {
        "one": single,
        "8x1x1": partitioning.create_mesh(8, 1, 1),
        "2x2x2": partitioning.create_mesh(2, 2, 2),
    }.items():
        grads[name], report[name] = _train_once(model, sgd, objective, mesh, batch, initial_state)
    report["max_grad"] = max(float(np.abs(a).max()) for a in jax.tree.leaves(grads["one"]))
    for name in ("8x1x1", "2x2x2"):
        report[f"max_grad_diff_{name}"] = max(
            float(np.abs(a - b).max())
            for a, b in zip(
                jax.tree.leaves(grads["one"]), jax.tree.leaves(grads[name]), strict=True
            )
        )
    return report


def test_sharded_terms_equal_one_device():
    report = eight_devices.run_worker(__file__, "sharded")
    for mesh in ("8x1x1", "2x2x2"):
        for metric, value in report["one"].items():
            if metric != "grad_norm":
                np.testing.assert_allclose(report[mesh][metric], value, rtol=1e-5, err_msg=metric)
        assert report[f"max_grad_diff_{mesh}"] <= 1e-5 * report["max_grad"], mesh
    assert report["one"]["slm_loss"] > 0 and report["one"]["rts_loss"] > 0
    assert report["one"]["same_document_loss"] > 0


# ----------------------------------------------------------------------------- Gin, heads


@pytest.mark.parametrize("gin_file", ["rts.gin", "slm.gin"])
def test_gin_files_build_the_objective_and_model(gin_file):
    gin = pytest.importorskip("gin")
    from test_e2s2_objective import _build_for_gin_test

    import e2s2_jax.configurables  # noqa: F401

    gin.external_configurable(_build_for_gin_test, "build_for_test")
    gin.clear_config()
    gin.add_config_file_search_path(REPO_ROOT)
    try:
        gin.parse_config_files_and_bindings(
            [
                os.path.join(REPO_ROOT, "gin/models/t5_1_1_tiny.gin"),
                os.path.join(REPO_ROOT, "gin/objectives", gin_file),
            ],
            [
                "build_for_test.objective = %OBJECTIVE",
                "build_for_test.model = @T5()",
                "T5.config = %MODEL_CONFIG",
                "build_for_test.feature_converter = @E2S2EncDecFeatureConverter()",
                "MIXTURE_OR_TASK_NAME = 'unused'",
            ],
        )
        objective, model, converter = gin.get_configurable("build_for_test")()
    finally:
        gin.clear_config()
    assert converter._with_noised_view is True
    assert objective.views == ("encoder_input_tokens_noised",)  # one pass
    assert objective.replaced_label == view_labels.SWAP_REPLACED
    params = init_params(model)
    if gin_file == "rts.gin":
        assert (objective.denoise_weight, objective.slm_weight) == (1.0, 0.0)
        assert params["head_rts"]["kernel"].shape == (64, 2)
    else:
        assert (objective.denoise_weight, objective.slm_weight) == (0.0, 1.0)
        assert params["head_slm"]["bias"].shape == (model.config.vocab_size,)


def test_new_heads_are_dropped_by_export_and_fine_tuning(tmp_path):
    pytest.importorskip("safetensors.numpy")
    from e2s2_jax.interop import hf
    from e2s2_jax.training.checkpoints import load_params_into

    model = swap_model()
    params = init_params(model)
    assert {"head_rts", "head_slm", "head_same_document"} <= set(params)
    hf.export_hf(model.config, params, str(tmp_path / "hf"))
    _, reimported = hf.import_hf(str(tmp_path / "hf"))
    plain = {k: v for k, v in params.items() if not k.startswith("head_")}
    assert jax.tree.structure(reimported) == jax.tree.structure(plain)
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 64, (2, 6)), jnp.int32)
    assert_close_to_scale(
        T5(model.config).apply({"params": reimported}, tokens, tokens),
        model.apply({"params": params}, tokens, tokens),
        ulps=16,  # the same weights through a program without the heads (test_heads's bound)
    )
    # Fine-tuning (T5.encoder_heads = ()) loads a pretraining run's params without the heads.
    from e2s2_jax.interop import params_io

    params_io.save_params(str(tmp_path / "pretrained"), model.config, params)
    finetune = init_params(T5(model.config), seed=1)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one_device, finetune)
    loaded, filled, ignored = load_params_into(str(tmp_path / "pretrained"), finetune, shardings)
    assert not filled and sorted({name.split("/")[0] for name in ignored}) == [
        "head_rts",
        "head_same_document",
        "head_slm",
    ]
    assert not {"head_rts", "head_slm", "head_same_document"} & set(loaded)


def test_slm_head_logits_against_numpy():
    config = tiny_config()
    model = T5(config, encoder_heads=(("slm", heads.SLMHead),))
    params = init_params(model)
    tokens = jnp.asarray(np.random.default_rng(3).integers(2, 64, (2, 7)), jnp.int32)
    _, intermediates = model.apply({"params": params}, tokens, tokens, return_intermediates=True)
    outputs = intermediates["heads"]["slm"]
    # The head ties to the model's own input embedding.
    np.testing.assert_array_equal(outputs.embedding, params["token_embedder"]["embedding"])
    logits = heads.slm_logits(outputs)
    hidden = np.asarray(outputs.hidden, np.float64)
    expected = hidden @ np.asarray(outputs.embedding, np.float64).T / np.sqrt(config.d_model)
    # d_model = 16 products per logit, summed in another order: 16 roundings of the scale.
    assert_close_to_scale(logits, expected + np.asarray(params["head_slm"]["bias"]), ulps=16)
    assert logits.shape == (2, 7, config.vocab_size)


if __name__ == "__main__":
    workers = {"sharded": _worker_sharded}
    print(json.dumps(workers[sys.argv[1]]()))
