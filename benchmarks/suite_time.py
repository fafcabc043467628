"""How long the test suite takes here, and how many tests it runs: the figures docs/testing.md
quotes, per machine and instruction set.

    python benchmarks/suite_time.py            # make test's pytest run (the whole suite)
    python benchmarks/suite_time.py --fast     # make test-fast's (-m "not slow")

Runs pytest as the Makefile does, prints its output as it goes, then a table of the counts and
the slowest tests, and writes ``benchmarks/results/suite_time_<tier><isa>.json`` with the
machine. Run it alone: two torch jobs on 2 cores slow each other several times over.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import isa_tag, machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")
DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)")


def run_suite(fast: bool, workers: int, extra: list[str]) -> tuple[dict, float, list[str]]:
    """(counts by outcome, wall seconds, output lines) of one pytest run."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--durations=30", "-p", "no:cacheprovider"]
    cmd += ["-n", str(workers), "--dist", "loadfile"]  # the Makefile's XDIST
    cmd += (["-m", "not slow"] if fast else []) + extra
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line.rstrip("\n"))
    proc.wait()
    seconds = time.perf_counter() - start
    summary = next((ln for ln in reversed(lines) if " in " in ln and COUNTS.search(ln)), "")
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in COUNTS.findall(summary)}  # fmt: skip
    counts["exit_code"] = proc.returncode
    return counts, seconds, lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="the fast tier (make test-fast)")
    parser.add_argument("--workers", type=int, default=2,
                        help="pytest-xdist workers, as make's TEST_WORKERS (0: one process)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    counts, seconds, lines = run_suite(args.fast, args.workers, args.pytest_args)
    slowest = [{"seconds": float(m.group(1)), "phase": m.group(2), "test": m.group(3)}
               for m in map(DURATION.match, lines) if m]  # fmt: skip
    info = machine_info()
    tier = "fast" if args.fast else "full"
    result = {"machine": info, "tier": tier, "workers": args.workers, "pytest_args": args.pytest_args,
              "seconds": seconds, "minutes": seconds / 60, **counts, "slowest": slowest}  # fmt: skip
    print(f"\n{'tier':<6}{'passed':>8}{'skipped':>9}{'failed':>8}{'minutes':>9}  machine")
    print(f"{tier:<6}{counts.get('passed', 0):>8}{counts.get('skipped', 0):>9}"
          f"{counts.get('failed', 0):>8}{seconds / 60:>9.1f}  {info['cpu']}, {info['cpu_cores']} cores, "
          f"{info['torch_cpu_capability']}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"suite_time_{tier}{isa_tag(info)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
