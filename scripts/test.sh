#!/usr/bin/env bash
# Install vlajax with its test and LIBERO extras into ./.venv and run the whole test suite.
# Works on a fresh CPU-only machine (Python 3.11+); LIBERO tests use the offline asset pack
# ../shared/libero-assets.tar.xz (or $VLAJAX_LIBERO_ASSETS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Headless rendering (MuJoCo / LIBERO) needs an EGL driver: Mesa's software one is enough.
if ! ldconfig -p | grep -q 'libEGL.so.1'; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null
  else
    echo "libEGL is missing: install libegl1 libegl-mesa0 libgl1-mesa-dri" >&2; exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,libero]'
export MUJOCO_GL=${MUJOCO_GL:-egl}
if [ -z "${VLAJAX_LIBERO_ASSETS:-}" ] && [ -f ../shared/libero-assets.tar.xz ]; then
  export VLAJAX_LIBERO_ASSETS="$(cd ../shared && pwd)/libero-assets.tar.xz"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 tests "$@"
