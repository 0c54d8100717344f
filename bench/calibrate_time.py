"""Time `steerguard calibrate demo` end to end (model load from cache included), with its peak memory,
and print the summary.

    python bench/calibrate_time.py [--threads 2] [--out docs/bench_calibrate.txt] [--keep DIR]

Target (issue: guard training): under 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/bench_calibrate.txt"))
    ap.add_argument("--keep", type=Path, default=None, help="write the guard here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "steerguard", "--threads", str(args.threads), "calibrate",
                            "demo", "-o", str(args.keep or Path(tmp) / "guard")], capture_output=True, text=True)
        seconds = time.perf_counter() - t
    if r.returncode or "written to" not in r.stdout:
        print(r.stderr, file=sys.stderr)
        return r.returncode or 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20     # KiB -> GiB (Linux)
    report = (f"steerguard calibrate demo: {seconds:.0f} s ({seconds / 60:.1f} min) wall, {args.threads} threads, "
              f"target < 15 min; peak memory {peak:.1f} GiB\nmachine: {platform.machine()} {os.cpu_count()} cores, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n{r.stdout}")
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
