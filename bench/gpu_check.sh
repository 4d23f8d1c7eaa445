#!/usr/bin/env bash
# GPU check: the kernel tests compiled on the GPU (not interpreted), every test marked `gpu`
# elsewhere in tests/ (e.g. cuDNN attention), then bench/kernels.py. One table at the end.
# Budget: under 8 minutes on one H100.
# The kernel tests need only a CUDA JAX, numpy, pytest and hypothesis (no grain / pydantic):
# `menagerie.kernels` imports nothing else, and they load no conftest above tests/kernels. The
# `gpu`-marked tests need the package's dependencies; without them the step says NOT RUN.
# Knobs (environment): TEST_K, a pytest -k expression selecting a subset of the kernel tests;
# TEST_SHARDS, the number of pytest processes (default 6);
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

echo "== kernel tests, compiled on the GPU (MENAGERIE_KERNEL_IMPL=pallas), ${TEST_SHARDS:-6} processes"
# Compiling (Triton, XLA) is most of the time and runs on the CPU: split the tests round-robin
# over several pytest processes. No XLA autotuning: they compile many small programs once each.
# No preallocation: the processes share the GPU's memory.
shards="${TEST_SHARDS:-6}"
logs="$(mktemp -d)"
mapfile -t ids < <("$PY" -m pytest tests/kernels --collect-only -q -p no:cacheprovider \
  --rootdir . --confcutdir tests/kernels -o addopts="" ${TEST_K:+-k "$TEST_K"} | grep '::')
echo "${#ids[@]} tests"
pids=()
for ((s = 0; s < shards; s++)); do
  mine=()
  for ((i = s; i < ${#ids[@]}; i += shards)); do mine+=("${ids[$i]}"); done
  [ "${#mine[@]}" -eq 0 ] && continue
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" XLA_PYTHON_CLIENT_PREALLOCATE=false \
    MENAGERIE_KERNEL_IMPL=pallas timeout -k 10 "${TEST_TIMEOUT_S:-240}" "$PY" -m pytest -q \
    -p no:cacheprovider --rootdir . --confcutdir tests/kernels -o addopts="" -rfE "${mine[@]}" \
    >"$logs/$s.log" 2>&1 &
  pids+=("$!")
done
test_rc=0
for ((s = 0; s < ${#pids[@]}; s++)); do
  set +e
  wait "${pids[$s]}"
  rc=$?
  set -e
  [ "$rc" -ne 0 ] && test_rc=$rc
  [ "$rc" -eq 124 ] && echo "shard $s: TIMED OUT (time box ${TEST_TIMEOUT_S:-240}s)"
  # failures and errors (-rfE), then the shard's summary line
  grep -E "^(FAILED|ERROR) " "$logs/$s.log" || true
  echo "shard $s (rc=$rc): $(tail -n 1 "$logs/$s.log")"
done

echo "== GPU-only tests outside tests/kernels (pytest -m gpu)"
# They import the whole package (flax, pydantic, grain): run them where those are installed,
# and say plainly when they are not, rather than skipping in silence.
gpu_rc=0
missing="$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('flax', 'optax', 'pydantic', 'grain', 'orbax') if not u.find_spec(m)))")"
if [ -n "$missing" ]; then
  echo "NOT RUN: missing $missing (pip install -e . on this machine to run them)"
  gpu_rc=3
else
  set +e
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${TEST_TIMEOUT_S:-240}" "$PY" -m pytest -q \
    -p no:cacheprovider -o addopts="" -rfEs -m gpu tests --ignore=tests/kernels 2>&1 | tail -n 15
  gpu_rc=${PIPESTATUS[0]}
  set -e
fi

echo "== bench/kernels.py"
set +e
timeout -k 10 "${BENCH_TIMEOUT_S:-190}" "$PY" bench/kernels.py --budget-s "${BENCH_BUDGET_S:-130}" \
  ${TUNE:+--tune} ${BENCH_ARGS:-}
bench_rc=$?
set -e

echo "== summary: kernel tests rc=$test_rc, GPU-only tests rc=$gpu_rc, bench rc=$bench_rc"
[ "$test_rc" -eq 0 ] && [ "$gpu_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
