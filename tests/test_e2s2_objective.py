"""E2S2Objective: each term against an independent computation, one-view mode, packing, errors,
gradient accumulation, global vs per-shard negatives on 8 simulated devices, and the Gin files.

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
from test_heads import numpy_segment_pool
from test_nt_xent import numpy_nt_xent
from test_train_step import tiny_config

from e2s2_jax.data.view_labels import NO_PAIR
from e2s2_jax.models.heads import DenoisingHead
from e2s2_jax.models.t5 import T5
from e2s2_jax.objectives import E2S2Objective, Seq2SeqObjective

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
ENCODER_LENGTH, DECODER_LENGTH = 12, 6


def tiny_model(head_dropout: float = 0.0, **overrides) -> T5:
    """test_train_step's tiny T5 (vocabulary 64) with the denoising head, without the head's
    dropout by default: the train step enables dropout, and comparisons across microbatchings
    need the same masks."""
    head = functools.partial(DenoisingHead, dropout_rate=head_dropout)
    return T5(tiny_config(**overrides), encoder_heads=(("denoise", head),))


def random_example(rng, encoder_length: int, decoder_length: int) -> dict[str, np.ndarray]:
    """One unpacked E2S2 example: view M, view N (some tokens replaced, labels 2, some swapped,
    labels 1) and the span-corruption target."""
    masked = rng.integers(2, VOCAB, encoder_length).astype(np.int32)
    noised = masked.copy()
    labels = np.zeros(encoder_length, np.int32)
    replaced = rng.random(encoder_length) < 0.2
    noised[replaced] = rng.integers(2, VOCAB, replaced.sum())
    labels[replaced] = 2
    if encoder_length >= 3 and not replaced[:3].any():
        noised[[0, 1, 2]] = noised[[2, 0, 1]]
        labels[[0, 1, 2]] = (noised[[0, 1, 2]] != masked[[0, 1, 2]]).astype(np.int32)
    targets = rng.integers(2, VOCAB, decoder_length).astype(np.int32)
    return {"masked": masked, "noised": noised, "labels": labels, "targets": targets}


def pack(rows: list[list[dict]], encoder_length: int, decoder_length: int) -> dict[str, np.ndarray]:
    """Packs examples into rows (each row a list of examples) with segment ids and positions,
    as SeqIO's packing converter does; decoder inputs restart (0) at each segment."""
    batch = len(rows)
    out = {
        name: np.zeros((batch, length), np.int32)
        for name, length in [
            ("encoder_input_tokens", encoder_length),
            ("encoder_input_tokens_noised", encoder_length),
            ("encoder_noise_labels", encoder_length),
            ("encoder_segment_ids", encoder_length),
            ("encoder_positions", encoder_length),
            ("decoder_input_tokens", decoder_length),
            ("decoder_target_tokens", decoder_length),
            ("decoder_loss_weights", decoder_length),
            ("decoder_segment_ids", decoder_length),
            ("decoder_positions", decoder_length),
        ]
    }
    for row, examples in enumerate(rows):
        encoder_at = decoder_at = 0
        for segment, example in enumerate(examples, start=1):
            n, t = len(example["masked"]), len(example["targets"])
            enc, dec = slice(encoder_at, encoder_at + n), slice(decoder_at, decoder_at + t)
            out["encoder_input_tokens"][row, enc] = example["masked"]
            out["encoder_input_tokens_noised"][row, enc] = example["noised"]
            out["encoder_noise_labels"][row, enc] = example["labels"]
            out["encoder_segment_ids"][row, enc] = segment
            out["encoder_positions"][row, enc] = np.arange(n)
            out["decoder_target_tokens"][row, dec] = example["targets"]
            out["decoder_input_tokens"][row, dec] = np.concatenate([[0], example["targets"][:-1]])
            out["decoder_loss_weights"][row, dec] = 1
            out["decoder_segment_ids"][row, dec] = segment
            out["decoder_positions"][row, dec] = np.arange(t)
            encoder_at, decoder_at = encoder_at + n, decoder_at + t
    if any("pair" in example for examples in rows for example in examples):
        # The same-document task's label at each position of an example (NO_PAIR elsewhere).
        out["encoder_pair_labels"] = np.full((batch, encoder_length), NO_PAIR, np.int32)
        for row, examples in enumerate(rows):
            for segment, example in enumerate(examples, start=1):
                at = out["encoder_segment_ids"][row] == segment
                out["encoder_pair_labels"][row, at] = example.get("pair", NO_PAIR)
    return out


def unpacked_batch(seed: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Rows of one example each, with random amounts of padding."""
    rng = np.random.default_rng(seed)
    rows = [
        [
            random_example(
                rng,
                int(rng.integers(3, ENCODER_LENGTH + 1)),
                int(rng.integers(1, DECODER_LENGTH + 1)),
            )
        ]
        for _ in range(batch_size)
    ]
    batch = pack(rows, ENCODER_LENGTH, DECODER_LENGTH)
    return {k: v for k, v in batch.items() if "segment" not in k and "positions" not in k}


def packed_batch(seed: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Rows of one to three examples (segments)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch_size):
        count = int(rng.integers(1, 4))
        rows.append(
            [
                random_example(
                    rng,
                    int(rng.integers(3, ENCODER_LENGTH // 3 + 1)),
                    int(rng.integers(1, DECODER_LENGTH // 3 + 1)),
                )
                for _ in range(count)
            ]
        )
    return pack(rows, ENCODER_LENGTH, DECODER_LENGTH)


def init_params(model: T5, seed: int = 0):
    import flax.linen as nn

    tokens = jnp.ones((1, 4), jnp.int32)
    return nn.unbox(model.init(jax.random.key(seed), tokens, tokens)["params"])


def evaluate(objective, model, params, batch, jit: bool = True):
    """`(loss, metrics)` of the objective on a batch, without dropout."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def run(params, batch):
        return objective(model, params, batch, objective.normalizers(batch), None)

    loss, metrics = (jax.jit(run) if jit else run)(params, batch)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def numpy_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return logits - log_z[..., None], log_z


def test_terms_match_separate_passes_and_numpy():
    model = tiny_model()
    params = init_params(model)
    batch = unpacked_batch(0)
    objective = E2S2Objective(temperature=0.5, z_loss=1e-3)
    loss, metrics = evaluate(objective, model, params, batch)

    # Reference: each view through the model on its own, every term in NumPy.
    weights = batch["decoder_loss_weights"].astype(np.float64)
    reference = {}
    pooled = {}
    for view, name in [
        ("encoder_input_tokens_noised", "noised"),
        ("encoder_input_tokens", "masked"),
    ]:
        logits, intermediates = model.apply(
            {"params": params},
            batch[view],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            return_intermediates=True,
        )
        log_probs, log_z = numpy_log_softmax(logits)
        token_nll = -np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)
        reference[f"nll_{name}"] = np.sum(token_nll[..., 0] * weights) / weights.sum()
        reference[f"z_{name}"] = np.sum(1e-3 * log_z**2 * weights) / weights.sum()
        mask = batch[view] != 0
        pooled[name], valid = numpy_segment_pool(
            np.asarray(intermediates["encoder"].encoded), mask, None, 1
        )
        if name == "noised":
            noise_log_probs, _ = numpy_log_softmax(intermediates["heads"]["denoise"])
            labels = batch["encoder_noise_labels"]
            label_nll = -np.take_along_axis(noise_log_probs, labels[..., None], -1)[..., 0]
            reference["denoise_loss"] = label_nll[mask].mean()
            predictions = np.argmax(np.asarray(intermediates["heads"]["denoise"]), -1)
            reference["denoise_accuracy"] = (predictions == labels)[mask].mean()
            reference["denoise_majority_rate"] = (labels == 0)[mask].mean()
    contrast_sum, contrast_correct, anchors = numpy_nt_xent(
        pooled["noised"][:, 0], pooled["masked"][:, 0], valid[:, 0], temperature=0.5
    )
    reference["contrast_loss"] = contrast_sum / anchors
    reference["contrast_accuracy"] = contrast_correct / anchors
    reference["z_loss"] = 0.5 * reference["z_noised"] + 0.5 * reference["z_masked"]
    reference["loss"] = (
        0.5 * (reference["nll_noised"] + reference["nll_masked"])
        + reference["z_loss"]
        + 0.05 * reference["denoise_loss"]
        + 0.05 * reference["contrast_loss"]
    )
    for name in [
        "nll_noised",
        "nll_masked",
        "z_loss",
        "denoise_loss",
        "denoise_accuracy",
        "denoise_majority_rate",
        "contrast_loss",
        "contrast_accuracy",
        "loss",
    ]:
        np.testing.assert_allclose(metrics[name], reference[name], rtol=2e-5, err_msg=name)
    assert loss == metrics["loss"]
    assert metrics["contrast_dropped_segments"] == 0
    # The views differ, so the two NLLs must too (the split did not mix them up).
    assert abs(reference["nll_noised"] - reference["nll_masked"]) > 1e-4


def test_one_view_setting_runs_view_n_only():
    class RecordingModel:
        """Delegates to the model and records the encoder inputs it is applied to."""

        def __init__(self, model):
            self.model, self.calls = model, []

        def apply(self, variables, encoder_input_tokens, *args, **kwargs):
            self.calls.append(np.asarray(encoder_input_tokens))
            return self.model.apply(variables, encoder_input_tokens, *args, **kwargs)

    model = tiny_model()
    params = init_params(model)
    batch = unpacked_batch(1)
    one_view = E2S2Objective(nll_noised_weight=1.0, nll_masked_weight=0.0, contrast_weight=0.0)
    recording = RecordingModel(model)
    _, metrics = evaluate(one_view, recording, params, batch, jit=False)
    assert len(recording.calls) == 1
    np.testing.assert_array_equal(recording.calls[0], batch["encoder_input_tokens_noised"])
    assert "nll_masked" not in metrics and "contrast_loss" not in metrics
    assert {"nll_noised", "denoise_loss", "denoise_accuracy"} <= set(metrics)

    # The two-view default runs one pass of 2B rows, view N and M interleaved.
    recording = RecordingModel(model)
    evaluate(E2S2Objective(), recording, params, batch, jit=False)
    (inputs,) = recording.calls
    np.testing.assert_array_equal(inputs[0::2], batch["encoder_input_tokens_noised"])
    np.testing.assert_array_equal(inputs[1::2], batch["encoder_input_tokens"])

    # View M alone with T5's loss equals Seq2SeqObjective (label smoothing, z-loss passed on).
    view_m = E2S2Objective(
        nll_noised_weight=0.0,
        nll_masked_weight=1.0,
        denoise_weight=0.0,
        contrast_weight=0.0,
        z_loss=1e-3,
        label_smoothing=0.1,
    )
    plain = Seq2SeqObjective(z_loss=1e-3, label_smoothing=0.1)
    loss, _ = evaluate(view_m, model, params, batch)
    np.testing.assert_allclose(loss, evaluate(plain, model, params, batch)[0], rtol=1e-6)


def test_padded_and_packed_batches_give_the_same_terms():
    # The same 12 examples, one per row (padded) and packed three to a row: segment-masked
    # attention and relative positions make every encoder and decoder output equal, so every
    # term (the contrastive pooling per segment included) must agree.
    rng = np.random.default_rng(5)
    examples = [random_example(rng, int(rng.integers(3, 5)), 2) for _ in range(12)]
    padded = pack([[e] for e in examples], ENCODER_LENGTH, DECODER_LENGTH)
    padded = {k: v for k, v in padded.items() if "segment" not in k and "positions" not in k}
    packed = pack([examples[i : i + 3] for i in range(0, 12, 3)], ENCODER_LENGTH, DECODER_LENGTH)
    model = tiny_model()
    params = init_params(model)
    objective = E2S2Objective(temperature=0.2)
    padded_loss, padded_metrics = evaluate(objective, model, params, padded)
    packed_loss, packed_metrics = evaluate(objective, model, params, packed)
    for name, value in padded_metrics.items():
        np.testing.assert_allclose(packed_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert packed_metrics["contrast_loss"] > 0.1
    # With too few segment slots the third example of each row is dropped and counted.
    _, few_slots = evaluate(E2S2Objective(max_segments_per_row=2), model, params, packed)
    assert few_slots["contrast_dropped_segments"] == 4
    assert abs(few_slots["contrast_loss"] - packed_metrics["contrast_loss"]) > 1e-4


def test_missing_view_and_head_errors_say_what_to_do():
    model = tiny_model()
    params = init_params(model)
    batch = unpacked_batch(2)
    plain_batch = {k: v for k, v in batch.items() if "noise" not in k}
    with pytest.raises(ValueError, match=r"encoder_input_tokens_noised.*with_noised_view=True"):
        E2S2Objective().normalizers(plain_batch)
    # View M alone needs no view N.
    E2S2Objective(nll_noised_weight=0, denoise_weight=0, contrast_weight=0).normalizers(plain_batch)
    headless = T5(model.config)
    with pytest.raises(ValueError, match=r"T5.encoder_heads = \(\('denoise', @DenoisingHead\),\)"):
        evaluate(E2S2Objective(), headless, init_params(headless), batch)
    with pytest.raises(ValueError, match="per_shard_negatives=3"):
        evaluate(E2S2Objective(per_shard_negatives=3), model, params, batch)
    with pytest.raises(ValueError, match="temperature"):
        E2S2Objective(temperature=0.0)


def _train_once(model, optimizer, objective, mesh, batch, initial_state, num_microbatches=1):
    """One train step from `initial_state`; returns (params delta, metrics)."""
    from e2s2_jax.training.train_state import train_state_shardings
    from e2s2_jax.training.train_step import make_train_step

    _, shardings = train_state_shardings(model, optimizer, mesh)
    state = jax.device_put(initial_state, shardings)
    step = make_train_step(
        model, optimizer, objective, mesh, num_microbatches, state_shardings=shardings
    )
    before = jax.tree.map(np.asarray, jax.device_get(state.params))
    state, metrics = step(state, batch, jax.random.key(0))
    after = jax.tree.map(np.asarray, jax.device_get(state.params))
    delta = jax.tree.map(lambda a, b: a - b, before, after)
    return delta, {k: float(v) for k, v in metrics.items()}


def test_gradient_accumulation_equals_full_batch():
    # Exact for every term but the contrastive one, whose negatives are each microbatch's own
    # by nature, so it is off here. Plain SGD: the update is the gradient itself.
    import optax

    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state

    model = tiny_model()
    sgd = optax.sgd(1.0)
    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial_state = jax.device_get(init_train_state(model, sgd, mesh, jax.random.key(3))[0])
    batch = packed_batch(4, batch_size=8)
    objective = E2S2Objective(nll_masked_weight=0.3, contrast_weight=0.0, denoise_weight=0.5)
    full_grads, full_metrics = _train_once(model, sgd, objective, mesh, batch, initial_state)
    micro_grads, micro_metrics = _train_once(model, sgd, objective, mesh, batch, initial_state, 4)
    for name in ["loss", "nll_noised", "nll_masked", "denoise_loss", "denoise_accuracy"]:
        np.testing.assert_allclose(micro_metrics[name], full_metrics[name], rtol=1e-5)
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(full_grads))
    for full, micro in zip(jax.tree.leaves(full_grads), jax.tree.leaves(micro_grads), strict=True):
        np.testing.assert_allclose(micro, full, atol=1e-5 * largest)
    # The denoising head is trained.
    assert np.abs(full_grads["head_denoise"]["kernel"]).max() > 0


# ----------------------------------------------------------------------------- 8 devices


def _worker_negatives() -> dict:
    """Runs in the 8-device subprocess: contrastive metrics on 1 and 8 devices, global and
    per-shard negatives, and the encoder outputs the NumPy reference pools."""
    import optax

    from e2s2_jax.training import partitioning
    from e2s2_jax.training.train_state import init_train_state

    assert jax.device_count() == 8, jax.devices()
    model = tiny_model()
    sgd = optax.sgd(0.1)
    single = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial_state = jax.device_get(init_train_state(model, sgd, single, jax.random.key(0))[0])
    batch = packed_batch(6, batch_size=16)
    report: dict = {}
    runs = {
        "global_1": (E2S2Objective(temperature=0.5), single),
        "global_8x1x1": (E2S2Objective(temperature=0.5), partitioning.create_mesh(8, 1, 1)),
        "global_2x2x2": (E2S2Objective(temperature=0.5), partitioning.create_mesh(2, 2, 2)),
        "per_shard_8x1x1": (
            E2S2Objective(temperature=0.5, per_shard_negatives=8),
            partitioning.create_mesh(8, 1, 1),
        ),
    }
    grads = {}
    for name, (objective, mesh) in runs.items():
        grads[name], report[name] = _train_once(model, sgd, objective, mesh, batch, initial_state)
    report["max_grad_diff_8x1x1"] = max(
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(grads["global_1"]), jax.tree.leaves(grads["global_8x1x1"]), strict=True
        )
    )
    report["max_grad"] = max(float(np.abs(a).max()) for a in jax.tree.leaves(grads["global_1"]))
    # Encoder outputs at the initial params, for the NumPy pooling and NT-Xent.
    encoded = {}
    for view in ("encoder_input_tokens_noised", "encoder_input_tokens"):
        _, intermediates = model.apply(
            {"params": initial_state.params},
            batch[view],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            batch["encoder_segment_ids"],
            batch["decoder_segment_ids"],
            return_intermediates=True,
        )
        encoded[view] = np.asarray(intermediates["encoder"].encoded).tolist()
    report["encoded"] = encoded
    report["batch"] = {k: v.tolist() for k, v in batch.items()}
    return report


@pytest.fixture(scope="module")
def negatives_report() -> dict:
    return eight_devices.run_worker(__file__, "negatives")


def numpy_contrast(report, num_groups):
    batch = {k: np.asarray(v) for k, v in report["batch"].items()}
    pooled = {}
    for view, encoded in report["encoded"].items():
        pooled[view], valid = numpy_segment_pool(
            np.asarray(encoded), batch[view] != 0, batch["encoder_segment_ids"], 8
        )
    loss_sum, _, anchors = numpy_nt_xent(
        pooled["encoder_input_tokens_noised"].reshape(-1, pooled["encoder_input_tokens"].shape[-1]),
        pooled["encoder_input_tokens"].reshape(-1, pooled["encoder_input_tokens"].shape[-1]),
        valid.reshape(-1),
        temperature=0.5,
        num_groups=num_groups,
    )
    return loss_sum / anchors


def test_global_negatives_match_one_device(negatives_report):
    reference = negatives_report["global_1"]
    for name in ("global_8x1x1", "global_2x2x2"):
        for metric in ("loss", "contrast_loss", "contrast_accuracy", "nll_noised", "denoise_loss"):
            np.testing.assert_allclose(
                negatives_report[name][metric], reference[metric], rtol=1e-5, err_msg=name
            )
    assert negatives_report["max_grad_diff_8x1x1"] <= 1e-5 * negatives_report["max_grad"]
    np.testing.assert_allclose(
        reference["contrast_loss"], numpy_contrast(negatives_report, 1), rtol=1e-5
    )


def test_per_shard_negatives_match_a_per_shard_reference(negatives_report):
    per_shard = negatives_report["per_shard_8x1x1"]["contrast_loss"]
    global_loss = negatives_report["global_1"]["contrast_loss"]
    np.testing.assert_allclose(per_shard, numpy_contrast(negatives_report, 8), rtol=1e-5)
    # Fewer negatives per anchor: a different (lower) loss.
    assert per_shard < global_loss - 0.1
    np.testing.assert_allclose(
        negatives_report["per_shard_8x1x1"]["nll_noised"],
        negatives_report["global_1"]["nll_noised"],
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------- Gin


def _build_for_gin_test(objective, model, feature_converter):
    return objective, model, feature_converter


@pytest.mark.parametrize(
    "gin_file", ["e2s2.gin", "e2s2_denoise_only.gin", "e2s2_contrast_only.gin"]
)
def test_gin_files_build_the_objective_and_model(gin_file):
    gin = pytest.importorskip("gin")
    import e2s2_jax.configurables  # noqa: F401
    from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter

    gin.external_configurable(_build_for_gin_test, "build_for_test")  # idempotent
    gin.clear_config()
    gin.add_config_file_search_path(REPO_ROOT)  # the ablation files include e2s2.gin
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
            ],
        )
        objective, model, converter = gin.get_configurable("build_for_test")()
    finally:
        gin.clear_config()
    assert isinstance(objective, E2S2Objective)
    assert isinstance(converter, E2S2EncDecFeatureConverter)
    assert converter._with_noised_view is True
    expected = {
        "e2s2.gin": (0.5, 0.5, 0.05, 0.05),
        "e2s2_denoise_only.gin": (1.0, 0.0, 0.05, 0.0),
        "e2s2_contrast_only.gin": (0.5, 0.5, 0.0, 0.05),
    }[gin_file]
    weights = (
        objective.nll_noised_weight,
        objective.nll_masked_weight,
        objective.denoise_weight,
        objective.contrast_weight,
    )
    assert weights == expected
    assert objective.temperature == 1.0
    # The model has the heads the objective needs, and the objective runs on it.
    params = init_params(model)
    assert ("head_denoise" in params) == (objective.denoise_weight != 0)
    batch = unpacked_batch(3)
    batch = {k: np.minimum(v, model.config.vocab_size - 1) for k, v in batch.items()}
    loss, metrics = evaluate(objective, model, params, batch)
    assert np.isfinite(loss) and loss > 0


if __name__ == "__main__":
    workers = {"negatives": _worker_negatives}
    print(json.dumps(workers[sys.argv[1]]()))
