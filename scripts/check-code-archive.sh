#!/usr/bin/env bash
# Builds pgolf from its code archive (BUILD_DIR/pgolf_code.tar.xz: the minified sources whose size is
# the artifact's code bytes) and checks that the program built from it trains exactly like the one in
# BUILD_DIR: a few CPU steps of the tiny preset on the FineWeb validation prefix must give the same
# log lines (timings aside) and a bit-identical final model.
#
#   scripts/check-code-archive.sh [BUILD_DIR]     (default: build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$(cd "$root/${1:-build}" && pwd)"
shared="${PGOLF_SHARED_DIR:-$root/../shared}"
archive="$build/pgolf_code.tar.xz"
[ -s "$archive" ] || { echo "check-code-archive: no $archive (build pgolf first)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
tar -C "$work/src" -xJf "$archive"
echo "check-code-archive: $(stat -c %s "$archive") bytes, $(find "$work/src" -type f | wc -l) files," \
  "$(du -sb "$work/src" | cut -f1) bytes unpacked"
cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPGOLF_TESTS=OFF -DPGOLF_BENCH=OFF >/dev/null
cmake --build "$work/build" -j "$(nproc)" --target pgolf

train() {  # train BINARY OUT
  "$1" train --preset tiny --device cpu --threads 2 --out "$2" \
    --data "$shared/data/fineweb_val_prefix/fineweb_val_prefix_000000.bin" \
    --val "$shared/data/fineweb_val_prefix/fineweb_val_prefix_000000.bin" \
    --tokenizer "$shared/data/tokenizers/fineweb_1024_bpe.model" \
    --set iterations=4 --set train_log_every=1 --set val_loss_every=2 --set val_max_tokens=16384 \
    --set checkpoint_every=0 |
    sed -E -e 's/ (train_time|step_avg|eval_time):[0-9.]+ms//g' -e 's/train_time [0-9.]+ s/train_time -/' \
      -e "s#$2#RUN#g" >"$2.log"
}
train "$build/pgolf" "$work/run_repository"
train "$work/build/pgolf" "$work/run_archive"
diff "$work/run_repository.log" "$work/run_archive.log"
cmp "$work/run_repository/final_model.safetensors" "$work/run_archive/final_model.safetensors"
echo "check-code-archive: the program built from the archive trains identically" \
  "($(grep -c train_loss "$work/run_archive.log") logged steps, final model bit-identical)"
