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
  "$VENV/bin/pip" install --quiet -r requirements-test.txt
  echo "$want" > "$stamp"
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" -m e2s2_jax.demo "$@"
    ;;
  test)
    setup
    shift
    # Two workers: much of the suite is single-threaded (imports, tracing, subprocess start-up).
    exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
    ;;
  *)
    sed -n '2,5p' "$0"
    exit 2
    ;;
esac
