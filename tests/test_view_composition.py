"""Encoder-side views composed with other tasks: E2S2 + SSR records + SurfaceFusion train
together from the README command, and a mixture of span corruption (no second view) and E2S2
trains with encoder terms over the rows that have a view only."""

from __future__ import annotations

import numpy as np
import pytest
from test_encoder_training import README_COMMAND, train_argv

E2S2_FROM_SCRATCH = [  # the README's weights for E2S2 from scratch on the tiny model
    "--gin.E2S2Objective.denoise_weight=1.0",
    "--gin.E2S2Objective.contrast_weight=0.5",
]


def falls(values: np.ndarray) -> bool:
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
    for term in ("nll_noised", "nll_masked", "denoise_loss", "contrast_loss"):
        assert np.all(np.isfinite(metrics[term])), term
        assert falls(metrics[term]), (term, metrics[term])
    assert "denoise_accuracy" in metrics and "denoise_majority_rate" in metrics


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
    assert falls(metrics["nll_noised"]) and np.all(np.isfinite(metrics["contrast_loss"]))
