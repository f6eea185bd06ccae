#!/usr/bin/env bash
# e2s2-jax launcher.
#   ./launch.sh demo    set up .venv (pinned requirements) and run the CPU demo
#   ./launch.sh test    set up .venv (pinned requirements + test extras) and run the tests
# Environment: PYTHON (interpreter for the venv, default python3.11), VENV (default .venv),
# TEST_WORKERS (pytest-xdist workers, default 2).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

setup() {
  # (Re)install only when the pinned requirements changed since the last install.
  local stamp="$VENV/.requirements.sha256"
  local want
  want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  command -v "$PYTHON" >/dev/null || { echo "launch.sh: $PYTHON not found; set PYTHON=" >&2; exit 1; }
  echo "launch.sh: installing pinned requirements into $VENV (a few minutes the first time)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # No byte-compiling at install: Python compiles the modules that are imported when they are
  # first imported (measured: transformers installs in 1.6 s instead of 11.8 s).
  "$VENV/bin/pip" install --quiet --no-compile -r requirements-test.txt
  echo "$want" > "$stamp"
}

keep_bytecode() {
  # Compiled modules are kept, under $VENV/pycache. With PYTHONDONTWRITEBYTECODE set (as it is on
  # this project's machines) and the --no-compile install above, every Python process compiled
  # each module it imported from source: 7-8 s of every trainer start-up went to compiling
  # TensorFlow, SeqIO and JAX (measured: `main train`, tiny model, 4 steps, warm JAX cache:
  # 21.6 s before, 14.3 s after). Modules are compiled once, when first imported.
  unset PYTHONDONTWRITEBYTECODE
  PYTHONPYCACHEPREFIX="$(cd "$VENV" && pwd)/pycache"
  export PYTHONPYCACHEPREFIX
}

case "${1:-}" in
  demo)
    setup
    keep_bytecode
    shift
    exec "$VENV/bin/python" -m e2s2_jax.demo "$@"
    ;;
  test)
    setup
    keep_bytecode
    shift
    # Two workers: much of the suite is single-threaded (imports, tracing, subprocess start-up).
    # loadfile: a module's tests run on one worker, so a module-scoped fixture (an 8-device
    # subprocess, a trained model) is built once. (loadgroup would group finer, but
    # pytest-xdist 3.8 cannot mark groups under pytest 9.)
    exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    sed -n '2,5p' "$0"
    exit 2
    ;;
esac
