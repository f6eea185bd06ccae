#!/bin/bash
# Pilot: in-domain span corruption (seed 0), then the stage's fine-tuning on kjv_to_web and wiki_topic.
set -e
cd "$(dirname "$0")/../../.."
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=.:study/medium/pilots_in_domain
PY=${PYTHON:-python}
R=$PWD/study/medium/pilots/in_domain/runs  # not committed (study/*/pilots/ is ignored)
G="--gin_file=gin/tasks/study.gin --gin_file=study/medium/pilots_in_domain/pilot_in_domain.gin --gin_file=gin/models/t5_1_1_study_medium.gin"
[ -d $R/pretrain/seed0/checkpoints/2000 ] || $PY -m e2s2_jax.main train $G --gin_file=gin/runs/pretrain.gin --gin_file=gin/runs/adamw.gin \
  --gin.MODEL_DIR=\"$R/pretrain/seed0\" --gin.MIXTURE_OR_TASK_NAME=\"study_span_corruption_in_domain\" \
  "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}" --gin.TRAIN_STEPS=2000 --gin.BATCH_SIZE=32 \
  --gin.optax.warmup_cosine_decay_schedule.peak_value=0.01 --gin.optax.warmup_cosine_decay_schedule.warmup_steps=250 \
  --gin.train.seed=0 --gin.train.data_seed=0 --gin.train.log_every=100 --gin.train.checkpoint_every=500 \
  --gin.train.keep_checkpoints=1 --gin.train.eval_every=0
export PYTHONPATH=.
G="--gin_file=gin/tasks/study.gin --gin_file=gin/models/t5_1_1_study_medium.gin"
for task in kjv_to_web wiki_topic; do
  D=$R/finetune/seed0/$task
  [ -f $D/test_metrics.json ] && continue
  $PY -m e2s2_jax.main train $G --gin_file=gin/runs/finetune.gin --gin_file=gin/runs/adamw.gin \
    --gin.MODEL_DIR=\"$D\" --gin.MIXTURE_OR_TASK_NAME=\"downstream_$task\" \
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 64}" --gin.INITIAL_CHECKPOINT=\"$R/pretrain/seed0\" \
    --gin.TRAIN_STEPS=500 --gin.BATCH_SIZE=32 --gin.optax.warmup_cosine_decay_schedule.peak_value=0.003 \
    --gin.optax.warmup_cosine_decay_schedule.warmup_steps=50 --gin.train.seed=0 --gin.train.data_seed=0 \
    --gin.train.log_every=50 --gin.train.checkpoint_every=500 --gin.train.keep_checkpoints=1 --gin.train.eval_every=0
  $PY -m e2s2_jax.main eval $G --gin_file=gin/runs/eval.gin --gin.MODEL_DIR=\"$D\" \
    --gin.MIXTURE_OR_TASK_NAME=\"downstream_$task\" "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 64}" \
    '--gin.evaluate.split="test"' --gin.evaluate.batch_size=64 --gin.evaluate.eval_batches=2 \
    --gin.evaluate.max_decode_examples=-1 --gin.DecodeConfig.max_decode_length=64 | tee $D.eval.txt
done
