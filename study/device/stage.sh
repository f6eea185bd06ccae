#!/usr/bin/env bash
# One stage of the staged study on an accelerator, at T5 1.1 small (e2s2_jax/study_sizes.py):
#
#   bash study/device/stage.sh sensitivity      # then surface_fusion, e2s2, ssr
#
# Needs the project installed with its study extra and a jax for the accelerator, e.g.
#   python -m venv .venv && .venv/bin/pip install -e '.[study]' 'jax[cuda12]==<the pinned jax>'
# The stage resumes where it stopped (rerun the same command), writes study/small/<stage>/ and
# regenerates README.md's staged-study section. Environment: OUT (default study), SEEDS (3).
#
# Not runnable on the workplace's lent device image as it is: that image has jax, flax, optax
# and orbax but no TensorFlow, SeqIO or gin-config, and TensorFlow (the SeqIO input pipeline)
# cannot travel as a wheel within the 64 MiB a call carries. The small size's budgets are
# the T5 paper's small-model regime scaled down, not yet fitted to a measured device step time.
set -euo pipefail
stage=${1:?usage: bash study/device/stage.sh sensitivity|surface_fusion|e2s2|ssr}
cd "$(dirname "$0")/../.."
out=${OUT:-study}
mkdir -p "$out"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
python=${PYTHON:-.venv/bin/python}
"$python" -c "import jax; print('devices:', jax.devices())"
"$python" -m e2s2_jax.study --size small --stage "$stage" --seeds "${SEEDS:-3}" --out "$out" \
  --readme README.md 2>&1 | tee -a "$out/small_${stage}.log"
