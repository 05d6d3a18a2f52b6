"""``make bench``: every benchmark in ``bench/`` with small defaults, one JSON summary.

Each benchmark runs as its own process (one Ray per benchmark); its exit status, wall time,
the last lines it printed (where every benchmark prints its ratios) and, for those that
write one, its own JSON go into ``--out`` (default ``runs/bench/summary.json``). Exits
non-zero if any benchmark failed. The sizes here are for a 2-core machine (minutes, not
hours); the docstring of each benchmark gives the full-size command behind
``docs/benchmarks.md``.

    .venv/bin/python bench/run_all.py [--out runs/bench/summary.json] [--only train,imagine]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (script, small arguments, JSON flag or None)
BENCHMARKS: dict[str, tuple[str, list[str], str | None]] = {
    "collect": ("collect.py", ["--tasks", "8", "--episodes-per-task", "2", "--repeat", "1"], None),
    "ground": ("ground.py", ["--steps", "6"], None),
    "imagine": (
        "imagine.py",
        ["--requests", "64", "--batch-size", "64", "--naive-requests", "4"]
        + ["--new-tokens", "111", "--max-steps", "10"],
        "--out",
    ),
    "train_cql": (
        "train.py",
        ["--algo", "cql", "--transitions", "20000", "--updates", "20", "--rounds", "2", "--memory"],
        "--json",
    ),
    "train_dcql": (
        "train.py",
        [
            "--algo",
            "dcql",
            "--transitions",
            "20000",
            "--updates",
            "30",
            "--rounds",
            "3",
            "--memory",
        ],
        "--json",
    ),
    "train_units": ("train_units.py", ["--iterations", "2"], "--json"),
    "evaluate": (
        "evaluate.py",
        ["--policies", "1", "--max-tasks-per-level", "4", "--repeat", "1"],
        None,
    ),
    "gpu_smoke": ("gpu_smoke.py", [], None),  # exits 0 with a message where there is no GPU
}


def run_one(name: str, tmp: str) -> dict:
    script, args, json_flag = BENCHMARKS[name]
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    out_json = os.path.join(tmp, f"{name}.json")
    if json_flag:
        cmd += [json_flag, out_json]
    print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = round(time.perf_counter() - t, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    tail = lines[-12:]
    print("\n".join(tail), flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
    result = {"command": cmd[1:], "rc": proc.returncode, "wall_s": wall, "tail": tail}
    if json_flag and os.path.exists(out_json):
        with open(out_json) as f:
            result["json"] = json.load(f)
    print(f"=== {name}: rc {proc.returncode} in {wall}s\n", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/summary.json")
    p.add_argument("--only", help="comma-separated names (default: all)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="kalm-bench-") as tmp:
        for name in names:
            summary["benchmarks"][name] = run_one(name, tmp)
    failed = [n for n, r in summary["benchmarks"].items() if r["rc"] != 0]
    summary["failed"] = failed
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"summary -> {out}" + (f"; FAILED: {', '.join(failed)}" if failed else "; all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
