#!/usr/bin/env python3
"""Appends measurements to the records in bench/records/:

    scripts/bench-record.py --commit C --command "pgolf bench ..." [--gpu G] [--date YYYY-MM-DD] RESULT.json...

A `pgolf bench --json` result goes to pgolf-bench.jsonl (tokens/s, ms/step, MFU, memory, optimizer
and evaluation timings, the top kernels; scripts/device-check.sh writes them as
pgolf_bench_PRESET.json under its OUT folder); a `pgolf run` results.json to pgolf-run.jsonl (steps,
bpb at every stage, artifact bytes, phase times). Each line: date, commit, GPU, the command ({preset}
is filled in) and the result itself.
"""
import argparse
import datetime
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--commit", required=True)
parser.add_argument("--command", required=True, help="the command that produced the results ({preset} is filled in)")
parser.add_argument("--date", default=datetime.date.today().isoformat())
parser.add_argument("--gpu", help="the GPU (a run's results do not name it)")
parser.add_argument("results", nargs="+")
args = parser.parse_args()

records = root / "bench" / "records"
for path in args.results:
    result = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    is_run = "phase_seconds" in result
    needed = ("preset", "steps", "val_final", "artifact") if is_run else ("preset", "gpu", "tokens_per_s", "mfu")
    missing = [k for k in needed if k not in result]
    if missing:
        raise SystemExit(f"{path}: not a pgolf {'run' if is_run else 'bench --json'} result (no {missing})")
    gpu = args.gpu or result.get("gpu")
    if not gpu:
        raise SystemExit(f"{path}: give --gpu (the result does not name the GPU)")
    if is_run:
        result.get("artifact", {}).pop("path", None)  # a path on the machine that ran it
    line = {"date": args.date, "commit": args.commit, "gpu": gpu,
            "command": args.command.replace("{preset}", result["preset"]), "result": result}
    record = records / ("pgolf-run.jsonl" if is_run else "pgolf-bench.jsonl")
    with open(record, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
    if is_run:
        print(f"{result['preset']:>10}: {result['steps']} steps, final bpb {result['val_final']['val_bpb']:.5f}, "
              f"{result['artifact']['total_bytes']} bytes -> {record}")
    else:
        print(f"{result['preset']:>10}: {result['tokens_per_s'] / 1e6:.3f} M tokens/s, "
              f"{result['ms_per_step']:.2f} ms/step, MFU {100 * result['mfu']:.1f} % -> {record}")
