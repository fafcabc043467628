"""fp32 against bf16 (fp32 masters): final validation loss and tokens/s of the same run.

Trains the `small` MoNE model (the `make train` run: 600 steps of 16 x 256 bytes) once per
precision, one after the other, each in a fresh subprocess, and reads the runs' metrics.
Goal (issue: real-scale numerics): bf16 within 0.02 nats of fp32. On a CPU without bf16 matrix
units (no AMX) bf16 is slower than fp32: the tokens/s show the CPU, not what bf16 buys on a GPU.
Prints a table and writes benchmarks/results/precision_quality_<device>.json.

    python benchmarks/precision_quality.py [--steps 600] [--model small] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_NATS = 0.02


def train(precision: str, steps: int, model: str, run_dir: Path) -> dict:
    """One run in a subprocess; its final/curve validation losses and median tokens/s."""
    overrides = [
        f"model={model}", f"trainer.precision={precision}", f"trainer.steps={steps}",
        f"trainer.eval_interval={max(1, steps // 4)}", f"trainer.save_interval={steps}",
        f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", *overrides], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"precision_quality: {precision} run failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return {
        "precision": precision,
        "final_val_loss": curve[-1][1],
        "val_curve": curve,
        "tokens_per_s": statistics.median(rates),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--model", default="small")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            print(f"precision_quality: training {args.model} in {precision}, {args.steps} steps")
            rows.append(train(precision, args.steps, args.model, Path(tmp) / precision))
    fp32, bf16 = rows
    gap = bf16["final_val_loss"] - fp32["final_val_loss"]
    print("\n| precision | final val loss (nats/byte) | tokens/s | wall s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['final_val_loss']:.4f} | {r['tokens_per_s']:,.0f} | "
              f"{r['wall_s']} |")  # fmt: skip
    verdict = "met" if abs(gap) <= GOAL_NATS else "NOT met"
    print(f"\nbf16 - fp32 = {gap:+.4f} nats/byte (goal: within {GOAL_NATS}: {verdict}); "
          f"bf16 tokens/s = {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f} x fp32")  # fmt: skip
    machine = machine_info()
    device = "gpu" if machine["gpu"] else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"precision_quality_{device}.json"
    path.write_text(
        json.dumps(
            {
                "machine": machine,
                "model": args.model,
                "steps": args.steps,
                "runs": rows,
                "bf16_minus_fp32": gap,
                "goal_nats": GOAL_NATS,
                "goal_met": abs(gap) <= GOAL_NATS,
            },
            indent=2,
        )  # fmt: skip
        + "\n"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
