#!/usr/bin/env bash
# Installs pgolf's dependencies (Debian packages), configures and builds it.
# Usage: scripts/setup.sh [cmake-preset]   (default: release; "cpu" builds without CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config git xz-utils zstd \
  libsentencepiece-dev sentencepiece libzstd-dev liblzma-dev libbrotli-dev zlib1g-dev \
  libcli11-dev nlohmann-json3-dev libtomlplusplus-dev libfmt-dev libopenblas-dev \
  libgtest-dev libgmock-dev libbenchmark-dev gnuplot-nox fortunes fortunes-min

cmake --preset "$preset"
cmake --build --preset "$preset" -j "$(nproc)"
echo "pgolf built: $(ls build*/pgolf | head -n 1)"
