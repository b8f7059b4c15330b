# Sourced by the device scripts: the environment of the programs of an unpacked bundle of
# scripts/device-pack.sh. Usage: source device-env.sh UNPACKED_ROOT  (the folder holding pgolf/).
# Sets bin (the programs' folder) and exports LD_LIBRARY_PATH, PGOLF_SHARED_DIR and PGOLF_CONFIG_DIR.
bin="$1/pgolf/bin"
# The tests find the bundled shared data (golden dumps, FineWeb prefix) through PGOLF_SHARED_DIR.
[ -d "$1/pgolf/shared" ] && export PGOLF_SHARED_DIR="$1/pgolf/shared"
export PGOLF_CONFIG_DIR="$1/pgolf/configs"
export LD_LIBRARY_PATH="$bin/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NCCL: the toolkit's copy where it has one, else the one the Python wheels (nvidia-nccl) installed.
if ldd "$bin/pgolf" | grep -q 'libnccl.so.2 => not found'; then
  nccl_lib="$(python3 -c 'import glob, site; print(next(iter(sorted(f for d in site.getsitepackages() for f in glob.glob(d + "/nvidia/**/libnccl.so.2", recursive=True))), ""))' 2>/dev/null)"
  [ -n "$nccl_lib" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$nccl_lib")" && echo "== NCCL from $nccl_lib"
fi
