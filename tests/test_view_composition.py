"""Encoder-side views composed with other tasks: E2S2 + SSR records + SurfaceFusion train
together from the README command, and a mixture of span corruption (no second view) and E2S2
trains with encoder terms over the rows that have a view only.

Measured (48 steps of 16 rows, 64/16 tokens, 2 shared cores): nll_noised 9.37 -> 5.92,
nll_masked 9.36 -> 5.90, denoise_loss 1.09 -> 0.95 (accuracy 0.36 -> 0.69 against a majority
rate of 0.80: not yet above it), contrast_loss flat at 2.8-3.0 with contrast_accuracy 1.0 from
the first step: about 17 long SSR records per batch, views that share 85% of their tokens, so
the positives are found at once and the loss sits below chance (log(2N - 1) ~ 3.5) without
falling in this budget.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_encoder_training import README_COMMAND, train_argv

E2S2_FROM_SCRATCH = [  # the README's weights for E2S2 from scratch on the tiny model
    "--gin.E2S2Objective.denoise_weight=1.0",
    "--gin.E2S2Objective.contrast_weight=0.5",
]


def falls(values: np.ndarray) -> bool:
    """The mean of the last three logged values is below that of the first three."""
    return values[-3:].mean() < values[:3].mean()


def test_e2s2_ssr_surface_fusion_train_together(tmp_path):
    from test_encoder_training import run_main
    from test_ssr_tasks import _corpus_records

    records = tmp_path / "records"
    records.mkdir()
    _corpus_records(records, 64)
    argv = [
        "train",
        "--gin_file=gin/models/t5_1_1_tiny.gin",
        "--gin_file=gin/models/surface_fusion.gin",
        *README_COMMAND[2:],
        "--gin_file=gin/objectives/ssr_e2s2.gin",
        f'--gin.SSR_RECORDS_DIR="{records}"',
        *E2S2_FROM_SCRATCH,
    ]
    metrics = run_main(tmp_path / "run", train_argv(argv))
    for term in ("nll_noised", "nll_masked", "denoise_loss"):
        assert np.all(np.isfinite(metrics[term])), term
        assert falls(metrics[term]), (term, metrics[term])
    chance = np.log(metrics["contrast_anchor_count"] - 1)  # uniform over 2N - 1 candidates
    assert np.all(metrics["contrast_loss"] < chance), (metrics["contrast_loss"], chance)
    for name in ("denoise_accuracy", "denoise_majority_rate", "contrast_accuracy"):
        assert np.all(np.isfinite(metrics[name])), name


def test_mixture_of_span_corruption_and_e2s2(tmp_path):
    seqio = pytest.importorskip("seqio")
    import jax.numpy as jnp
    from test_encoder_training import run_main

    import tasks  # noqa: F401
    from e2s2_jax.data import view_labels
    from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter
    from e2s2_jax.objectives import E2S2Objective

    name = "bundled_span_corruption_and_e2s2"
    batch = next(
        seqio.get_dataset(
            name,
            task_feature_lengths={"inputs": 64, "targets": 16},
            dataset_split="validation",
            shuffle=False,
            feature_converter=E2S2EncDecFeatureConverter(pack=True, with_noised_view=True),
        )
        .batch(16)
        .as_numpy_iterator()
    )
    labels, tokens = batch["encoder_noise_labels"], batch["encoder_input_tokens_noised"]
    with_view = (tokens != 0) & (labels != view_labels.NO_SECOND_VIEW)
    assert 0 < with_view.sum() < (tokens != 0).sum()  # both kinds of rows are there
    normalizers = E2S2Objective().normalizers({k: jnp.asarray(v) for k, v in batch.items()})
    assert float(normalizers["denoise_weight_sum"]) == with_view.sum()
    argv = [
        *README_COMMAND,
        "--gin_file=gin/objectives/e2s2.gin",
        f'--gin.MIXTURE_OR_TASK_NAME="{name}"',
    ]
    metrics = run_main(tmp_path / "run", train_argv([*argv, *E2S2_FROM_SCRATCH], steps=16))
    assert metrics["nll_noised"][-1] < metrics["nll_noised"][0]
    for term in ("denoise_loss", "contrast_loss", "denoise_accuracy"):
        assert np.all(np.isfinite(metrics[term])), term
