"""MoE against MoNE step time on one device: tokens/s, MFU, peak memory and the MoNE/MoE ratio.

Runs the real trainer (a fresh subprocess per flavour) on a one-device slice of a shipped model
(its layer shapes and all its experts, fewer layers), reads the trainer's own metrics
(tokens/s per log interval, and on a GPU MFU and peak allocated memory) and drops the first
interval (warm-up, compilation). GPU goal (issue: the GPU speed path): MoNE/MoE step time
<= 1.05 at rho = 0.5 in bf16 with grouped experts. On a CPU the figures only show that the
script works (--dry-run: the `tiny` model, a few steps, in seconds; the tests run it).

    python benchmarks/step_time.py [--model 1b] [--layers 4] [--seq 4096] [--micro-batch 2]
        [--steps 30] [--precision bf16] [--out DIR] [--dry-run]

Prints a table and writes step_time_<device>.json into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO = 1.05


def overrides_for(args, flavour: str, run_dir: Path) -> list[str]:
    log = max(1, args.steps // 3)
    return [
        f"model={args.model}", f"model.num_layers={args.layers}", f"moe={flavour}",
        f"trainer.precision={args.precision}", f"trainer.seq_length={args.seq}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch}", f"trainer.steps={args.steps}",
        f"trainer.log_interval={log}", f"trainer.eval_interval={args.steps}",
        "trainer.eval_iters=1", "trainer.save_interval=0", f"trainer.run_dir={run_dir}",
        "logging.wandb_mode=disabled", *args.overrides,
    ]  # fmt: skip


# The trainer's CLI, reporting its own peak resident set on exit (stderr, last line).
CHILD = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF)"
    ".ru_maxrss, file=sys.stderr))\n"
    "sys.argv = ['mone-train', *sys.argv[1:]]\n"
    "runpy.run_module('mone_train.train', run_name='__main__')\n"
)


def run_flavour(args, flavour: str, run_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *overrides_for(args, flavour, run_dir)],
        capture_output=True, text=True, timeout=args.timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"step_time: {flavour} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r.get("tokens_per_s")][1:]  # the first interval warms up
    if not logged:
        raise SystemExit(f"step_time: {flavour}: too few steps to time (raise --steps)")
    mfu = [r["mfu"] for r in logged if r.get("mfu") is not None]
    peak = [r["peak_memory_gib"] for r in logged if r.get("peak_memory_gib") is not None]
    rss = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("MAXRSS_KIB")]
    return {
        "flavour": flavour,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in logged),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": max(peak) if peak else None,
        "peak_rss_gib": int(rss[-1]) / 2**20 if rss else None,
        "params": json.loads((run_dir / "params.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 6 steps (CPU check)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.model, args.layers, args.seq, args.micro_batch, args.steps = "tiny", 2, 64, 4, 6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in ("moe", "mone"):
            print(f"step_time: {flavour}, {args.model} x {args.layers} layers, {args.precision}, "
                  f"{args.micro_batch} x {args.seq} tokens, {args.steps} steps", flush=True)  # fmt: skip
            rows.append(run_flavour(args, flavour, Path(tmp) / flavour))
    moe, mone = rows
    ratio = moe["tokens_per_s"] / mone["tokens_per_s"]  # MoNE step time / MoE step time

    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    print("\n| flavour | tokens/s | MFU | peak GPU memory GiB | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['flavour']} | {r['tokens_per_s']:,.0f} | {cell(r['mfu'], '.1%')} | "
              f"{cell(r['peak_memory_gib'], '.2f')} | {cell(r['peak_rss_gib'], '.2f')} |")  # fmt: skip
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    print(f"\nMoNE/MoE step time {ratio:.3f} (GPU goal <= {GOAL_RATIO}: {verdict})")
    machine = machine_info()
    device = "gpu" if machine["gpu"] else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step_time_{device}{'_dry_run' if args.dry_run else ''}.json"
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    path.write_text(json.dumps({"machine": machine, "setup": setup, "runs": rows,
                                "mone_over_moe_step_time": ratio}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
