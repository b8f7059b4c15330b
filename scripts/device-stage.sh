#!/usr/bin/env bash
# Stages the data of a GPU preset run into a folder that a device call can carry (64 MiB in all):
# the training shards xz-compressed, an optional held-out shard, the validation shard and the tokenizer.
#
#   scripts/device-stage.sh OUT_DIR --tokenizer MODEL --val VAL.bin [--heldout HELDOUT.bin] TRAIN.bin...
#
# On the GPU machine scripts/device-run.sh unpacks it (train_*.bin, heldout.bin, val.bin, tokenizer.model).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
out="$1"; shift
tokenizer="" val="" heldout="" train=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --val) val="$2"; shift 2 ;;
    --heldout) heldout="$2"; shift 2 ;;
    *) train+=("$1"); shift ;;
  esac
done
[ -n "$tokenizer" ] && [ -n "$val" ] && [ ${#train[@]} -gt 0 ] || { echo "device-stage: needs --tokenizer, --val and training shards" >&2; exit 2; }
mkdir -p "$out"
rm -f "$out"/train_*.bin.xz "$out"/heldout.bin.xz
cp "$tokenizer" "$out/tokenizer.model"
cp "$val" "$out/val.bin"
i=0
for f in "${train[@]}"; do
  xz -6 -T"$(nproc)" -c "$f" >"$out/train_$(printf '%06d' $i).bin.xz.tmp"
  mv "$out/train_$(printf '%06d' $i).bin.xz.tmp" "$out/train_$(printf '%06d' $i).bin.xz"
  i=$((i + 1))
done
[ -z "$heldout" ] || xz -6 -c "$heldout" >"$out/heldout.bin.xz"
du -sh "$out"
ls -l "$out"
