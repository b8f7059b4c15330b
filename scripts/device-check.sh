#!/usr/bin/env bash
# Runs on the GPU machine: unpacks the bundle written by scripts/device-pack.sh, prints the GPU,
# runs every GPU test program and the benchmarks, and ends with a summary table.
#
#   bash device-check.sh [BUNDLE]      (default: pgolf-devpack.tar.xz beside this script)
#
# Environment: OUT — when set, gtest XML reports and full logs are written there;
# GTEST_FILTER — passed to the test programs by gtest itself; BENCH_ARGS — extra bench_cuda
# arguments; SKIP_BENCH=1 — tests only. Exit status: 0 when every program succeeded.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bundle="${1:-$here/pgolf-devpack.tar.xz}"
work="$(mktemp -d)"
tar -C "$work" -xJf "$bundle" || { echo "device-check: cannot unpack $bundle" >&2; exit 1; }
bin="$work/pgolf/bin"
export LD_LIBRARY_PATH="$bin/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
logs="${OUT:-$work/logs}"
mkdir -p "$logs"

echo "== bundle of commit $(cat "$work/pgolf/COMMIT")"
echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
  --format=csv || echo "nvidia-smi failed"
for p in "$bin"/*; do
  [ -f "$p" ] || continue
  if ldd "$p" | grep -q "not found"; then
    echo "device-check: $(basename "$p") lacks libraries:"
    ldd "$p" | grep "not found"
  fi
done
"$bin/pgolf" --version

status=0
rows=()
for t in "$bin"/test_*; do
  name="$(basename "$t")"
  echo "== $name"
  start=$SECONDS
  timeout 400 "$t" --gtest_output="xml:$logs/$name.xml" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  passed="$(sed -n 's/^\[  PASSED  \] \([0-9]*\) tests\{0,1\}\..*/\1/p' "$logs/$name.log" | tail -n 1)"
  failed="$(sed -n 's/^\[  FAILED  \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' "$logs/$name.log" | tail -n 1)"
  rows+=("$(printf '%-14s %6s %7s %7s %7ss' "$name" "$rc" "${passed:-0}" "${failed:-0}" "$((SECONDS - start))")")
  [ "$rc" = 0 ] || status=1
done

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== bench_cuda"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout 300 "$bin/bench_cuda" ${BENCH_ARGS:-} 2>&1 | tee "$logs/bench_cuda.log"
  rc=${PIPESTATUS[0]}
  rows+=("$(printf '%-14s %6s %7s %7s %7ss' bench_cuda "$rc" - - "$((SECONDS - start))")")
  [ "$rc" = 0 ] || status=1
fi

echo
echo "== summary"
printf '%-14s %6s %7s %7s %8s\n' program exit passed failed time
printf '%s\n' "${rows[@]}"
for t in "$bin"/test_*; do
  grep '^\[  FAILED  \] [A-Za-z]' "$logs/$(basename "$t").log" | grep -v ' ms)$' | sort -u
done
if [ -f "$logs/bench_cuda.log" ]; then
  echo
  grep -E '^(device|kernel|gemm|linear|attn|optim)' "$logs/bench_cuda.log"
fi
exit "$status"
