"""E2S2 end to end: the tiny T5 1.1 trained 300 steps on the bundled corpus's E2S2 task with
the smoke recipe (gin/runs/smoke.gin: rows of 128/32 tokens, AdamW with RMS-scaled steps,
warm-up + cosine decay): every term falls, the denoising head beats the majority class and the
contrastive loss beats chance (log(2N - 1)).

The encoder-side weights are raised from the reference's 0.05 (tuned for continued pretraining
of an already trained encoder) to `DENOISE_WEIGHT` = 1.0 and `CONTRAST_WEIGHT` = 0.5. Measured
with this recipe and seeds over the first -> last 30 steps:
- weights 1.0 / 0.5: denoising accuracy 0.39 -> 0.804 (majority rate 0.777), denoise loss
  1.085 -> 0.547, contrastive loss 3.58 -> 3.42;
- the reference's 0.05 / 0.05: accuracy stays at the majority rate (0.774 against 0.777;
  it passes it after about 750 steps) and the contrastive loss rises (3.88 -> 3.98: the two
  views share 85% of their tokens, so it starts far below chance, and a 0.05 weight does not
  hold it there while the encoder's outputs grow alike);
- 0.5 / 0.05: accuracy 0.809, but the contrastive loss rises (3.88 -> 4.13);
- 0.5 / 0.5 at batch 16: the contrastive loss falls (2.87 -> 2.66) but denoising stalls
  (accuracy 0.63).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import optax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 300
BATCH_SIZE = 32
LENGTHS = {"inputs": 128, "targets": 32}
WINDOW = 30  # steps averaged at the start and at the end
PEAK_LEARNING_RATE, WARMUP_STEPS = 0.01, 50  # gin/runs/smoke.gin
DENOISE_WEIGHT, CONTRAST_WEIGHT = 1.0, 0.5


def tiny_config():
    """`MODEL_CONFIG` of gin/models/t5_1_1_tiny.gin."""
    import gin

    import e2s2_jax.configurables  # noqa: F401

    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(REPO_ROOT, "gin/models/t5_1_1_tiny.gin"))
        return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def history() -> dict:
    seqio = pytest.importorskip("seqio")
    import tasks  # noqa: F401  (registers bundled_e2s2)
    from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter
    from e2s2_jax.models.heads import DenoisingHead
    from e2s2_jax.models.t5 import T5
    from e2s2_jax.objectives import E2S2Objective
    from e2s2_jax.training import optimizers, partitioning
    from e2s2_jax.training.train_state import init_train_state
    from e2s2_jax.training.train_step import make_train_step

    dataset = seqio.get_dataset(
        "bundled_e2s2",
        task_feature_lengths=LENGTHS,
        dataset_split="train",
        shuffle=True,
        seed=0,
        num_epochs=None,
        feature_converter=E2S2EncDecFeatureConverter(pack=True, with_noised_view=True),
    ).batch(BATCH_SIZE, drop_remainder=True)
    model = T5(tiny_config(), encoder_heads=(("denoise", DenoisingHead),))
    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, PEAK_LEARNING_RATE, WARMUP_STEPS, STEPS, end_value=1e-5
    )
    optimizer = optimizers.make_optimizer("adamw_rms_scaled", schedule, gradient_clip_norm=1.0)
    state, shardings = init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = make_train_step(
        model,
        optimizer,
        E2S2Objective(denoise_weight=DENOISE_WEIGHT, contrast_weight=CONTRAST_WEIGHT),
        mesh,
        state_shardings=shardings,
    )
    metrics_per_step, label_counts = [], np.zeros(3)
    for index, batch in enumerate(dataset.take(STEPS).as_numpy_iterator()):
        state, metrics = step(state, partitioning.make_global_batch(batch, mesh), jax.random.key(1))
        metrics_per_step.append(metrics)
        if index >= STEPS - WINDOW:
            positions = batch["encoder_input_tokens_noised"] != 0
            label_counts += np.bincount(batch["encoder_noise_labels"][positions], minlength=3)
    metrics_per_step = jax.device_get(metrics_per_step)
    assert len(metrics_per_step) == STEPS
    metrics = {k: np.array([m[k] for m in metrics_per_step]) for k in metrics_per_step[0]}
    # Shown with `pytest -s`: each metric's mean over the first and the last WINDOW steps.
    for name, values in sorted(metrics.items()):
        print(f"{name:28s} {values[:WINDOW].mean():10.4f} -> {values[-WINDOW:].mean():10.4f}")
    return {"metrics": metrics, "label_prior": label_counts / label_counts.sum()}


@pytest.mark.parametrize("term", ["nll_noised", "nll_masked", "denoise_loss", "contrast_loss"])
def test_every_term_falls(history, term):
    values = history["metrics"][term]
    assert np.all(np.isfinite(values))
    first, last = values[:WINDOW], values[-WINDOW:]
    # By at least 2%, and by more than 3 standard errors of the two windows' means.
    standard_error = np.sqrt((first.var() + last.var()) / WINDOW)
    assert last.mean() < 0.98 * first.mean(), (term, first.mean(), last.mean())
    assert first.mean() - last.mean() > 3 * standard_error, (term, standard_error)


def test_denoising_beats_the_majority_class(history):
    metrics = history["metrics"]
    # The objective's own majority rate agrees with the labels counted here, from the batches.
    majority = metrics["denoise_majority_rate"][-WINDOW:].mean()
    np.testing.assert_allclose(majority, history["label_prior"][0], rtol=1e-3)
    accuracy = metrics["denoise_accuracy"][-WINDOW:]
    # Above the majority rate on average by more than 10 standard errors of a window of
    # ~30 x 32 x 128 positions (about 0.0015), and on most single steps.
    assert accuracy.mean() > majority + 0.015, (accuracy.mean(), majority)
    assert np.mean(accuracy > metrics["denoise_majority_rate"][-WINDOW:]) > 0.8
    # Cross-entropy ends below the entropy of the label prior: more than the prior is learnt.
    prior = history["label_prior"]
    assert metrics["denoise_loss"][-WINDOW:].mean() < -np.sum(prior * np.log(prior))


def test_contrast_beats_chance(history):
    metrics = history["metrics"]
    examples = metrics["contrast_anchor_count"][-WINDOW:] / 2
    chance = np.log(2 * examples - 1)  # uniform over the positive and 2N - 2 negatives
    assert np.all(metrics["contrast_loss"][-WINDOW:] < chance)
    assert metrics["contrast_accuracy"][-WINDOW:].mean() > 0.5
    assert math.isclose(examples.min(), BATCH_SIZE) or examples.min() > BATCH_SIZE
