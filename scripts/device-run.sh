#!/usr/bin/env bash
# Runs a preset end to end (pgolf run) on the GPU machine, from the bundle of scripts/device-pack.sh
# and the data staged by scripts/device-stage.sh. A run can outlast one device command: `start`
# launches it in its own session (setsid) and returns; `wait` follows it and collects its results.
#
#   bash device-run.sh start NAME [pgolf run arguments...]   e.g. start s691 --preset s691 --one-gpu
#   bash device-run.sh wait NAME SECONDS                     follow until it ends or SECONDS pass
#
# Environment: STAGE — the staged data folder (default .stage1 in the current folder); PGROOT — where
# the bundle, the data and the runs go (default /tmp/pgolf-device; runs in $PGROOT/runs/NAME);
# AFTER=OTHER — `start` stages the data now but the run begins when the run OTHER has ended (so two
# runs can be queued back to back on one GPU without timing each other).
# `wait` copies the run's results.json, metrics.jsonl, config.toml and log to $OUT/NAME when OUT is
# set. Exit status of wait: the run's, or 3 while it is still running.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${PGROOT:-/tmp/pgolf-device}"
stage="${STAGE:-.stage1}"
cmd="${1:-}" name="${2:-}"
[ -n "$cmd" ] && [ -n "$name" ] || { sed -n '2,15p' "$0"; exit 2; }
shift 2
run="$root/runs/$name"

case "$cmd" in
  start)
    if [ ! -d "$root/pgolf" ]; then
      mkdir -p "$root"
      tar -C "$root" -xJf "$here/pgolf-devpack.tar.xz" || { echo "device-run: cannot unpack the bundle" >&2; exit 1; }
    fi
    # shellcheck source=device-env.sh
    source "$here/device-env.sh" "$root"
    data="$root/data/$(basename "$stage")"
    mkdir -p "$data"
    for f in "$stage"/*.xz; do
      out="$data/$(basename "$f" .xz)"
      [ -s "$out" ] || { xz -dc "$f" >"$out.tmp" && mv "$out.tmp" "$out"; } &
    done
    wait
    cp "$stage/tokenizer.model" "$stage/val.bin" "$data/"
    ls -l "$data"
    held=()
    [ -f "$data/heldout.bin" ] && held=(--set "heldout_files=$data/heldout.bin")
    mkdir -p "$run"
    rm -f "$run.rc"
    echo "== $(date -u +%FT%TZ) pgolf run $* (log $run.log)"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
    after="${AFTER:+$root/runs/$AFTER.rc}"
    [ -n "$after" ] && echo "== waits for $AFTER to end"
    setsid bash -c 'while [ -n "$1" ] && [ ! -f "$1" ]; do sleep 2; done; shift
      "$@" >"$0.log" 2>&1 </dev/null; echo $? >"$0.rc"' "$run" "$after" \
      "$bin/pgolf" run --device cuda --no-plots --data "$data/train_*.bin" --val "$data/val.bin" \
      --tokenizer "$data/tokenizer.model" --out "$run" "${held[@]}" "$@" &
    sleep 20
    tail -n 20 "$run.log"
    ;;
  wait)
    limit="${1:-60}"
    start=$SECONDS
    while [ ! -f "$run.rc" ] && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 5; done
    tail -n 80 "$run.log"
    nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv,noheader
    if [ -n "${OUT:-}" ]; then
      mkdir -p "$OUT/$name"
      cp "$run.log" "$OUT/$name/run.log"
      for f in results.json metrics.jsonl config.toml; do [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$name/"; done
    fi
    [ -f "$run.rc" ] || { echo "device-run: $name is still running"; exit 3; }
    exit "$(cat "$run.rc")"
    ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
