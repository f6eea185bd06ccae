"""The staged study's sizes (e2s2_jax/study_stages.py): the model, every budget and the
evaluation of each, and which of them each stage's runs depend on."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageSize:
    """One size of the staged study: the model, every budget and the evaluation."""

    model_gin: str
    generator_bindings: tuple[str, ...]  # the SSR generator: the model file made larger
    pretrain_steps: int  # span-corruption pretraining (sensitivity) and each continuation
    pretrain_batch: int
    pretrain_lengths: tuple[int, int]
    pretrain_peak_lr: float
    continue_steps: int  # each arm's continued pretraining from span corruption (e2s2, ssr)
    finetune_steps: int
    finetune_batch: int
    finetune_lengths: tuple[int, int]
    finetune_lr: float  # the peak of the fine-tuning schedule (AdamW, warm-up, cosine decay)
    translation_steps: int  # SurfaceFusion: translation trained from scratch
    translation_batch: int
    translation_lengths: tuple[int, int]
    translation_peak_lr: float
    generator_steps: int
    ssr_examples: int
    decode_batch: int
    decode_examples: int  # test examples decoded for the task metrics; -1: the whole split
    probe_examples: int  # wiki_topic train examples the probe fits on (0: all)


SIZES = {
    # A few steps of everything, for the tests (the numbers mean nothing).
    "smoke": StageSize(
        model_gin="gin/models/t5_1_1_study_smoke.gin",
        generator_bindings=("T5Config.d_model=96", "T5Config.num_encoder_layers=3"),
        pretrain_steps=3,
        pretrain_batch=8,
        pretrain_lengths=(64, 16),
        pretrain_peak_lr=0.01,
        continue_steps=2,
        finetune_steps=2,
        finetune_batch=8,
        finetune_lengths=(32, 16),
        finetune_lr=1e-3,
        translation_steps=2,
        translation_batch=8,
        translation_lengths=(32, 16),
        translation_peak_lr=0.01,
        generator_steps=3,
        ssr_examples=32,
        decode_batch=8,
        decode_examples=8,
        probe_examples=64,
    ),
    # 2 CPU cores, about 2.5 hours a stage (see gin/models/t5_1_1_study_medium.gin).
    "medium": StageSize(
        model_gin="gin/models/t5_1_1_study_medium.gin",
        generator_bindings=(
            "T5Config.d_model=192",
            "T5Config.d_ff=512",
            "T5Config.num_heads=6",
            "T5Config.num_encoder_layers=4",
            "T5Config.num_decoder_layers=4",
        ),
        pretrain_steps=2000,
        pretrain_batch=32,
        pretrain_lengths=(128, 32),
        pretrain_peak_lr=0.01,
        continue_steps=500,
        finetune_steps=500,
        finetune_batch=32,
        finetune_lengths=(128, 64),
        finetune_lr=3e-3,
        translation_steps=800,
        translation_batch=32,
        translation_lengths=(64, 64),
        translation_peak_lr=0.01,
        generator_steps=3000,
        ssr_examples=8192,
        decode_batch=64,
        decode_examples=-1,
        probe_examples=0,
    ),
    # T5 1.1 small on an accelerator (study/device/<stage>.sh).
    "small": StageSize(
        model_gin="gin/models/t5_1_1_small.gin",
        generator_bindings=(
            "T5Config.d_model=768",
            "T5Config.d_ff=2048",
            "T5Config.num_heads=12",
            "T5Config.num_encoder_layers=12",
            "T5Config.num_decoder_layers=12",
        ),
        pretrain_steps=20000,
        pretrain_batch=128,
        pretrain_lengths=(512, 114),
        pretrain_peak_lr=0.01,
        continue_steps=5000,
        finetune_steps=2000,
        finetune_batch=64,
        finetune_lengths=(256, 128),
        finetune_lr=1e-3,
        translation_steps=20000,
        translation_batch=128,
        translation_lengths=(128, 128),
        translation_peak_lr=0.01,
        generator_steps=40000,
        ssr_examples=200_000,
        decode_batch=256,
        decode_examples=-1,
        probe_examples=0,
    ),
}

# The fields of StageSize each stage's runs depend on: a resumed stage refuses other values.
STAGE_FIELDS = {
    "sensitivity": ("model_gin", "pretrain_", "finetune_", "decode_"),
    "surface_fusion": ("model_gin", "translation_", "decode_"),
    "e2s2": ("model_gin", "pretrain_", "continue_", "finetune_", "decode_", "probe_"),
    "ssr": ("model_gin", "pretrain_", "continue_", "finetune_", "decode_", "generator_", "ssr_"),
}
STAGES = tuple(STAGE_FIELDS)
