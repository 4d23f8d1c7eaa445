#!/usr/bin/env bash
# GPU check of the Pallas kernels: the kernel tests compiled on the GPU (not interpreted), then
# bench/kernels.py. One table at the end. Budget: under 8 minutes on one H100.
# Needs only a CUDA JAX, numpy, pytest and hypothesis (no grain / pydantic): `menagerie.kernels`
# imports nothing else, and the kernel tests load no conftest above tests/kernels.
# Knobs (environment): TEST_K, a pytest -k expression selecting a subset of the kernel tests;
# TUNE=1 runs `bench/kernels.py --tune` (tile sweep, then the best tiles against the baselines)
# instead of the plain benchmark; TEST_TIMEOUT_S / BENCH_TIMEOUT_S / BENCH_BUDGET_S time boxes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

echo "== device"
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true) 2>&1
"$PY" -c "import jax, sys; print('python', sys.version.split()[0], '| jax', jax.__version__, '|', jax.devices())"

echo "== install (editable, no deps)"
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3; then
  echo "pip install failed; falling back to a PYTHONPATH shim"
fi
if ! "$PY" -c "import menagerie.kernels" 2>/dev/null; then
  # e.g. an externally managed Python: point a namespace package at kernels/ instead.
  shim="$(mktemp -d)"
  mkdir -p "$shim/menagerie"
  ln -s "$PWD/kernels" "$shim/menagerie/kernels"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import menagerie.kernels as k; print('menagerie.kernels from', k.__file__)"

echo "== kernel tests, compiled on the GPU (MENAGERIE_KERNEL_IMPL=pallas)"
set +e
# No XLA autotuning for the tests: they compile many small programs once each.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" MENAGERIE_KERNEL_IMPL=pallas timeout -k 10 "${TEST_TIMEOUT_S:-260}" "$PY" -m pytest tests/kernels \
  -q -p no:cacheprovider --rootdir . --confcutdir tests/kernels -o addopts="" -rfE \
  ${TEST_K:+-k "$TEST_K"}
test_rc=$?
set -e
[ "$test_rc" -eq 124 ] && echo "kernel tests: TIMED OUT (time box ${TEST_TIMEOUT_S:-260}s)"

echo "== bench/kernels.py"
set +e
timeout -k 10 "${BENCH_TIMEOUT_S:-190}" "$PY" bench/kernels.py --budget-s "${BENCH_BUDGET_S:-130}" \
  ${TUNE:+--tune} ${BENCH_ARGS:-}
bench_rc=$?
set -e

echo "== summary: kernel tests rc=$test_rc, bench rc=$bench_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
