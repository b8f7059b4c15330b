#!/usr/bin/env bash
# Builds pgolf (release preset) and packs what a bare GPU machine (CUDA toolkit and driver, no
# Debian development packages) needs to run the GPU tests and benchmarks without building: the GPU
# test programs, bench_cuda, pgolf, configs/, and every shared library they load except glibc's,
# the CUDA driver's and the CUDA toolkit's (the GPU machine has its own /usr/local/cuda/lib64).
#
#   scripts/device-pack.sh [OUTPUT_DIR]        (default: .devpack in the repository root)
#
# Writes OUTPUT_DIR/pgolf-devpack.tar.xz (tar + xz) and copies scripts/device-{check,env,run}.sh beside
# it; on the GPU machine, `bash OUTPUT_DIR/device-check.sh` unpacks and runs everything, and
# `bash OUTPUT_DIR/device-run.sh` runs a preset end to end (pgolf run) on data of scripts/device-stage.sh. The shared data the
# GPU tests read (the golden dumps of the five stacks, the FineWeb validation prefix) travel in the
# bundle's shared/ folder, taken from PGOLF_SHARED_DIR (default: ../shared beside the repository).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/.devpack}" && cd "${1:-$root/.devpack}" && pwd)"
cd "$root"

cmake --preset release >/dev/null
cmake --build --preset release -j "${PGOLF_BUILD_JOBS:-2}"

# The GPU test programs are those of tests/cuda (CTest label gpu).
programs=(build/pgolf build/bench_cuda build/test_cuda)
for p in "${programs[@]}"; do
  [ -x "$p" ] || { echo "device-pack: $p was not built (is nvcc in /usr/local/cuda?)" >&2; exit 1; }
done

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/pgolf/bin/lib"
cp "${programs[@]}" "$stage/pgolf/bin/"
# The code archive pgolf run counts and packs, from the build beside the pgolf binary.
cp build/pgolf_code.tar.xz "$stage/pgolf/bin/"
cp -r configs "$stage/pgolf/configs"
shared="${PGOLF_SHARED_DIR:-$root/../shared}"
mkdir -p "$stage/pgolf/shared/golden" "$stage/pgolf/shared/data/fineweb_val_prefix"
for stack in base s691 s562 s600 s1560; do
  cp "$shared/golden/$stack.json" "$shared/golden/$stack.safetensors" "$stage/pgolf/shared/golden/"
done
cp "$shared"/data/fineweb_val_prefix/*.bin "$stage/pgolf/shared/data/fineweb_val_prefix/"
git describe --always --dirty >"$stage/pgolf/COMMIT" 2>/dev/null || echo unknown >"$stage/pgolf/COMMIT"

# Libraries: everything ldd resolves, minus glibc (libc, libm, ld-linux, ...), the driver
# (libcuda, libnvidia-*) and the toolkit (anything under /usr/local/cuda*).
is_system_lib() {
  case "$(basename "$1")" in
    libc.so.* | libm.so.* | libmvec.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libresolv.so.* | \
      libutil.so.* | libanl.so.* | libnsl.so.* | ld-linux*.so.* | libcuda.so.* | libnvidia-*) return 0 ;;
  esac
  case "$1" in /usr/local/cuda*) return 0 ;; esac
  return 1
}
missing=0
while read -r name path; do
  if [ "$path" = "not" ]; then
    echo "device-pack: $name is not found by ldd" >&2
    missing=1
    continue
  fi
  is_system_lib "$path" || cp -L "$path" "$stage/pgolf/bin/lib/$name"
done < <(for p in "${programs[@]}"; do ldd "$p"; done | awk '$2 == "=>" {print $1, $3}' | sort -u)
[ "$missing" = 0 ] || exit 1

tmp="$out/pgolf-devpack.tar.xz.tmp.$$"
tar -C "$stage" -cf - pgolf | xz -T2 -3 >"$tmp"
mv "$tmp" "$out/pgolf-devpack.tar.xz"
cp scripts/device-check.sh scripts/device-env.sh scripts/device-run.sh "$out/"

echo "device-pack: $(du -h "$out/pgolf-devpack.tar.xz" | cut -f1) in $out/pgolf-devpack.tar.xz"
echo "  programs:  ${programs[*]}"
echo "  libraries: $(ls "$stage/pgolf/bin/lib" | tr '\n' ' ')"
