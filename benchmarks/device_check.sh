#!/usr/bin/env bash
# Issue 8's accelerator figures in one device call: T5 1.1 base, bf16 activations, our train
# step alone (tokens/s, MFU where the device's peak is known), at two batch sizes. Each run
# writes its JSON and its log under OUT; a run that fails or times out is recorded as such and
# the next one still runs. Prepared here, for a session that is lent a GPU (see RESULTS.md):
#
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl gin-config==0.5.0
#   device run, carry [".whl"]:  bash benchmarks/device_check.sh
#
# Environment: OUT (default /tmp/device_check), MODEL_GIN (default T5 1.1 base), BATCHES
# (default "64 128"), STEPS, ROUNDS, RUN_TIMEOUT (seconds per run, default 240), DTYPE.
# A CPU dry run with a tiny model: MODEL_GIN=gin/models/t5_1_1_tiny.gin BATCHES=4 bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python=${PYTHON:-python3}
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$python" -c \
  "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$out/environment.txt"

gin_file=${MODEL_GIN:-gin/models/t5_1_1_base.gin}
name=$(basename "$gin_file" .gin)
dtype=${DTYPE:-bfloat16}
for batch in ${BATCHES:-64 128}; do
  stem="$out/train_step_${name}_${dtype}_b${batch}"
  echo "[device_check] $name batch $batch" >&2
  timeout "${RUN_TIMEOUT:-240}" "$python" benchmarks/train_step.py --model_gin "$gin_file" \
    --contenders ours --dtype "$dtype" --batch_size "$batch" \
    --steps "${STEPS:-5}" --rounds "${ROUNDS:-3}" >"$stem.json" 2>"$stem.log"
  rc=$?
  echo "[device_check] $name batch $batch: exit $rc" | tee -a "$out/environment.txt" >&2
  tail -n 3 "$stem.log" >&2
done
