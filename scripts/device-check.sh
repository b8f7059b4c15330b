#!/usr/bin/env bash
# Runs on the GPU machine: unpacks the bundle written by scripts/device-pack.sh, prints the GPU,
# runs every GPU test program, the multi-process self-test (pgolf dist-selftest) and the benchmarks,
# and ends with a summary table.
#
#   bash device-check.sh [BUNDLE]      (default: pgolf-devpack.tar.xz beside this script)
#
# Environment: OUT — when set, gtest XML reports and full logs are written there;
# GTEST_FILTER — passed to the test programs by gtest itself; BENCH_ARGS — arguments of the kernel
# benchmark (the model benchmarks run after it); SKIP_KERNEL_BENCH=1 — no bench_cuda runs;
# SKIP_BENCH=1 — tests only. The last benchmarks are `pgolf bench` (whole training steps of the
# CUDA engine) for baseline (65,536 tokens of 1,024), s691 and s1560 (98,304 tokens of 2,048), also
# written as JSON (pgolf_bench_PRESET.json) when OUT is set. SKIP_DIST=1 —
# no multi-process check (pgolf dist-selftest). BENCH_SET — e.g. "--set attention_backward=wgmma":
# the `pgolf bench` runs are repeated with these arguments (JSON pgolf_bench_PRESET_variant.json), to
# compare a kernel choice on the same machine. Exit status: 0 when every program succeeded.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bundle="${1:-$here/pgolf-devpack.tar.xz}"
work="$(mktemp -d)"
tar -C "$work" -xJf "$bundle" || { echo "device-check: cannot unpack $bundle" >&2; exit 1; }
# shellcheck source=device-env.sh
source "$here/device-env.sh" "$work"
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
# Each test suite runs in its own process: a sticky CUDA error (an illegal address) ends only its suite.
# With GTEST_FILTER set, the filtered tests run in one process (gtest reads the variable itself).
for t in "$bin"/test_*; do
  name="$(basename "$t")"
  : >"$logs/$name.log"
  suites="$("$t" --gtest_list_tests | sed -n 's/^\([^ #][^ ]*\)\.$/\1/p')"
  [ -n "${GTEST_FILTER:-}" ] && suites="filtered"
  for suite in $suites; do
    echo "== $name $suite"
    start=$SECONDS
    filter=()
    [ "$suite" = filtered ] || filter=(--gtest_filter="$suite.*")
    timeout 400 "$t" "${filter[@]}" --gtest_output="xml:$logs/$name.${suite//\//_}.xml" 2>&1 | tee -a "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    passed="$(sed -n 's/^\[  PASSED  \] \([0-9]*\) tests\{0,1\}\..*/\1/p' "$logs/$name.log" | tail -n 1)"
    failed="$(sed -n 's/^\[  FAILED  \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' "$logs/$name.log" | tail -n 1)"
    rows+=("$(printf '%-40s %6s %7s %7s %7ss' "$name $suite" "$rc" "${passed:-0}" "${failed:-0}" "$((SECONDS - start))")")
    [ "$rc" = 0 ] || status=1
  done
done

# Several ranks, one process each, through the launcher, the rendezvous store and NCCL: one per GPU;
# on one GPU two processes share it (NCCL refuses two ranks of one communicator on one GPU, so each
# then checks NCCL at world size 1). SKIP_DIST=1 leaves it out.
if [ "${SKIP_DIST:-0}" != 1 ]; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  dist_args=(--nproc 2 --allow-shared-gpu)
  [ "$gpus" -ge 2 ] && dist_args=(--nproc "$gpus")
  echo "== pgolf dist-selftest ${dist_args[*]}"
  start=$SECONDS
  timeout 300 "$bin/pgolf" dist-selftest "${dist_args[@]}" --timeout 120 2>&1 | tee "$logs/dist_selftest.log"
  rc=${PIPESTATUS[0]}
  rows+=("$(printf '%-40s %6s %7s %7s %7ss' "pgolf dist-selftest ${dist_args[*]:0:2}" "$rc" - - "$((SECONDS - start))")")
  [ "$rc" = 0 ] || status=1
fi

if [ "${SKIP_BENCH:-0}" != 1 ] && [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
  # The kernels (GEMMs, attention), then one forward + backward of the full-size s691 (98,304 tokens
  # of 2048) and baseline (65,536 tokens of 1024) models with their per-kernel breakdown.
  : >"$logs/bench_cuda.log"
  for args in "${BENCH_ARGS:-}" "--model s691 --profile" "--model baseline --tokens 65536 --seq 1024 --profile"; do
    echo "== bench_cuda $args"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout 300 "$bin/bench_cuda" $args 2>&1 | tee -a "$logs/bench_cuda.log"
    rc=${PIPESTATUS[0]}
    rows+=("$(printf '%-40s %6s %7s %7s %7ss' "bench_cuda ${args:-kernels}" "$rc" - - "$((SECONDS - start))")")
    [ "$rc" = 0 ] || status=1
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # Whole optimizer steps of the CUDA engine (forward, backward, optimizer, EMA; one CUDA graph each)
  # at the one-GPU protocol's batches, the optimizer step alone, the evaluation forward, and the top
  # kernels of a step.
  : >"$logs/pgolf_bench.log"
  presets=("--preset baseline --batch-tokens 65536 --seq-len 1024" "--preset s691 --batch-tokens 98304 --seq-len 2048"
    "--preset s1560 --batch-tokens 98304 --seq-len 2048" "--preset s1560 --batch-tokens 98304 --seq-len 2048 --looping")
  variants=("${presets[@]}")
  [ -n "${BENCH_SET:-}" ] && for args in "${presets[@]}"; do variants+=("$args $BENCH_SET"); done
  for args in "${variants[@]}"; do
    preset="$(echo "$args" | cut -d' ' -f2)"
    case "$args" in *--looping*) preset="${preset}_looping" ;; esac
    case "$args" in *--set*) preset="${preset}_variant" ;; esac
    echo "== pgolf bench $args"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout 300 "$bin/pgolf" bench $args --profile 2>&1 | tee -a "$logs/pgolf_bench.log"
    rc=${PIPESTATUS[0]}
    # The same measurement as one JSON object (the record kept in bench/).
    # shellcheck disable=SC2086
    [ "$rc" = 0 ] && { timeout 300 "$bin/pgolf" bench $args --profile --json >"$logs/pgolf_bench_$preset.json" || rc=$?; }
    rows+=("$(printf '%-40s %6s %7s %7s %7ss' "pgolf bench $preset" "$rc" - - "$((SECONDS - start))")")
    [ "$rc" = 0 ] || status=1
  done
fi

echo
echo "== summary"
printf '%-40s %6s %7s %7s %8s\n' program exit passed failed time
printf '%s\n' "${rows[@]}"
for t in "$bin"/test_*; do
  grep '^\[  FAILED  \] [A-Za-z]' "$logs/$(basename "$t").log" | grep -v ' ms)$' | sort -u
done
if [ -f "$logs/bench_cuda.log" ]; then
  echo
  grep -E '^ *(device|kernel|gemm|linear|attn|optim|model)' "$logs/bench_cuda.log"
fi
if [ -f "$logs/pgolf_bench.log" ]; then
  echo
  grep -E '^(bench | +(train step|optimizer step|eval forward|device memory))' "$logs/pgolf_bench.log"
fi
exit "$status"
