"""Step-time cost of the hang watchdog: the trainer with it on (the default) and off, stepped in
turn in one process over many rounds (the interleaving of benchmarks/trainer_throughput.py).

The watchdog is a thread that wakes once a second to compare a timestamp, and the loop's phase
reports are a lock and an assignment each (seven per step): the goal is a cost within noise.

    python benchmarks/watchdog_overhead.py [--rounds 30] [--steps-per-turn 4]

Prints the paired ratio and writes benchmarks/results/watchdog_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from trainer_throughput import RESULTS, measure, quartiles, trainer_stepper  # noqa: E402

from mone_train.compose import compose_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps-per-turn", type=int, default=4)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
    from mone_train.runtime import configure_torch

    configure_torch(compose_config(args.overrides))
    info = init_distributed(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            steppers = [
                trainer_stepper("watchdog-on", args.overrides, Path(tmp), info),
                trainer_stepper(
                    "watchdog-off", [*args.overrides, "trainer.hang_timeout_s=0"], Path(tmp), info
                ),
            ]
            rates = measure(steppers, args.rounds, args.steps_per_turn, warmup=3)
            for stepper in steppers:
                stepper.close()
    finally:
        shutdown_distributed()
    ratios = [off / on for on, off in zip(rates["watchdog-on"], rates["watchdog-off"])]
    q1, median, q3 = quartiles(ratios)
    print(f"\nstep time with / without the watchdog: {median:.4f} (interquartile {q1:.4f} - "
          f"{q3:.4f}, {args.rounds} paired rounds)")  # fmt: skip
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"watchdog_overhead_{device}.json"
    out.write_text(json.dumps({
        "machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "out"},
        "step_time_ratio": median, "iqr": [q1, q3], "rounds": ratios,
        "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
