#!/usr/bin/env bash
# e2s2-jax launcher.
#   ./launch.sh demo    set up .venv (the pinned runtime requirements) and run the CPU demo
#   ./launch.sh test    set up .venv (the pinned requirements + the test extra) and run the tests
#   ./launch.sh compile ARGS   set up .venv with libtpu (the tpu extra) and run
#                       `python -m e2s2_jax.main compile ARGS` (a train step compiled for a TPU)
# Environment: PYTHON (interpreter for the venv, default python3.11), VENV (default .venv),
# TEST_WORKERS (pytest-xdist workers, default 2).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

setup() {
  # Installs this checkout, editable, with pyproject.toml's pinned dependencies and the extras in
  # $1 ("" for the demo, "test" for the tests, "tpu" for compile; pyproject.toml is the one list
  # of pins, and the test extra includes the others). Editable:
  # the venv imports the work tree, as PYTHONPATH does, never a stale copy in site-packages.
  # (Re)installs only when pyproject.toml's [build-system], [project] or [tool.setuptools] table
  # changed since the last install, or the extras asked for are not installed yet (a venv set up
  # for the tests serves the demo too).
  local extras=$1
  local stamp="$VENV/.requirements.sha256"
  command -v "$PYTHON" >/dev/null || { echo "launch.sh: $PYTHON not found; set PYTHON=" >&2; exit 1; }
  local want
  want=$("$PYTHON" -c 'import hashlib, json, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
pins = [p.get("build-system"), p.get("project"), p.get("tool", {}).get("setuptools")]
print(hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest())')
  local have have_extras
  read -r have have_extras 2>/dev/null < "$stamp" || true
  if [ -x "$VENV/bin/python" ] && [ "${have:-}" = "$want" ] &&
     { [ -z "$extras" ] || [ "${have_extras:-}" = "$extras" ] || [ "${have_extras:-}" = test ]; }; then
    return
  fi
  echo "launch.sh: installing the pinned requirements${extras:+ and the $extras extra} into $VENV" \
    "(a few minutes the first time)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # No byte-compiling at install: Python compiles the modules that are imported when they are
  # first imported (measured: transformers installs in 1.6 s instead of 11.8 s).
  # PYTHONWARNINGS: setuptools' notes on editable installs ("Editable installation ...") are
  # not for the user of launch.sh.
  PYTHONWARNINGS=ignore::UserWarning \
    "$VENV/bin/pip" install --quiet --no-compile -e ".${extras:+[$extras]}"
  echo "$want $extras" > "$stamp"
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

# CPU work: with libtpu installed (the tpu and test extras), JAX would otherwise try a TPU at
# start-up and log its failure. compile needs no local accelerator either.
export JAX_PLATFORMS=${JAX_PLATFORMS-cpu}

case "${1:-}" in
  compile)
    setup tpu
    keep_bytecode
    shift
    exec "$VENV/bin/python" -m e2s2_jax.main compile "$@"
    ;;
  demo)
    setup ""
    keep_bytecode
    shift
    exec "$VENV/bin/python" -m e2s2_jax.demo "$@"
    ;;
  test)
    setup test
    keep_bytecode
    shift
    # Two workers: much of the suite is single-threaded (imports, tracing, subprocess start-up).
    # loadfile: a module's tests run on one worker, so a module-scoped fixture (an 8-device
    # subprocess, a trained model) is built once. (loadgroup would group finer, but
    # pytest-xdist 3.8 cannot mark groups under pytest 9.)
    exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
