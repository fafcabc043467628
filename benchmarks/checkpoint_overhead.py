"""What checkpointing costs the training loop: the stall of a save, and throughput after it.

Each mode runs in a fresh process (a save can change the speed of the process that made it):

    none    no save: the reference step time
    sync    one synchronous save (the loop waits until the files are on disk)
    async   one asynchronous save (a forked writer writes while the loop goes on)

Per mode: the median step time in the ``--steps`` steps before the save and in the
``--steps`` steps after it (tokens/s before vs after: the after-save slowdown), the stall
(wall time the loop spent inside the save call, plus the wait for an asynchronous save to
finalize that the loop could not hide), and the step time while an asynchronous write is in
flight. Prints a table and writes JSON (with the machine) to benchmarks/results/.

    python benchmarks/checkpoint_overhead.py [--steps 50] [--overrides model=small ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("none", "sync", "async")


def measure(mode: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    """Train ``warmup + 2 * steps`` steps with one save (per ``mode``) in the middle."""
    from mone_train.components.checkpoint import model_signature
    from mone_train.components.checkpointer import Checkpointer, PreemptionFlag, TrainState
    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.compose import compose_config
    from mone_train.data.dataset import micro_batches
    from mone_train.data.run_data import build_run_data
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
    from mone_train.runtime import configure_torch

    run_dir = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    cfg = compose_config([*overrides, f"trainer.async_save={mode == 'async'}"])
    t = cfg.trainer
    configure_torch(cfg)
    info = init_distributed(1)
    preemption = PreemptionFlag()
    try:
        data = build_run_data(cfg, info, ((warmup + 2 * steps) * t.global_batch_size, 1, 1))
        model, params = build_model(cfg, data.tokenizer.vocab_size)
        optimizer = build_optimizer(cfg.optim, params)
        step = TrainStep(model, optimizer, params, causal_mask(t.seq_length, info.device), info,
                         accum=t.global_batch_size // t.micro_batch_size, clip_grad=1.0)  # fmt: skip
        checkpointer = Checkpointer(run_dir, model, optimizer, t, preemption=preemption,
                                    signature=model_signature(cfg, data.tokenizer.vocab_size),
                                    resolved_config={}, info=info)  # fmt: skip
        batches = micro_batches(data.train, 0, t.micro_batch_size, 0, 1)

        def timed(n: int, poll: bool = False) -> list[float]:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                step(batches, cfg.optim.lr)
                if poll:
                    checkpointer.poll()
                times.append(time.perf_counter() - start)
            return times

        timed(warmup)
        before = timed(steps)
        stall = in_flight = 0.0
        overlapped: list[float] = []
        if mode != "none":
            start = time.perf_counter()
            checkpointer.save(TrainState(warmup + steps, 0))
            stall = time.perf_counter() - start
            while checkpointer._pending is not None and len(overlapped) < steps:
                overlapped += timed(1, poll=True)
            start = time.perf_counter()
            checkpointer.wait()
            stall += time.perf_counter() - start
            in_flight = sum(overlapped)
        after = timed(steps - len(overlapped))
        checkpointer.close()
    finally:
        preemption.restore()
        shutdown_distributed()
    tokens = t.global_batch_size * t.seq_length
    return {
        "mode": mode,
        "step_s_before": statistics.median(before),
        "step_s_after": statistics.median(after),
        "tokens_per_s_before": tokens / statistics.median(before),
        "tokens_per_s_after": tokens / statistics.median(after),
        "save_stall_s": stall,
        "steps_during_async_write": len(overlapped),
        "step_s_during_async_write": statistics.median(overlapped) if overlapped else None,
        "async_write_s": in_flight,
    }


def summarise(results: dict[str, dict]) -> dict:
    """The issue's two ratios: async stall / sync stall, after / before throughput."""
    sync, asyn = results["sync"], results["async"]
    reference = results["none"]["step_s_before"]
    # An asynchronous save also slows the steps that overlap the writer; that cost counts too.
    overlap_cost = sum([asyn["async_write_s"] - asyn["steps_during_async_write"] * reference])
    return {
        "async_stall_over_sync_stall": (asyn["save_stall_s"] + max(0.0, overlap_cost))
        / sync["save_stall_s"],
        "after_over_before": {
            m: r["tokens_per_s_after"] / r["tokens_per_s_before"] for m, r in results.items()
        },  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (internal)")
    parser.add_argument(
        "--overrides", nargs="*", default=["model=small", "logging.wandb_mode=disabled"]
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.warmup, args.overrides)))
        return
    results = {}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--overrides", *args.overrides],
            capture_output=True, text=True, check=True,
            env={**os.environ, "TORCHDYNAMO_DISABLE": "1", "WANDB_MODE": "disabled"},
        )  # fmt: skip
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    summary = summarise(results)
    print(f"checkpoint overhead, {' '.join(args.overrides)}, {args.steps} steps before/after")
    print(
        f"{'mode':<6} {'tok/s before':>13} {'tok/s after':>12} {'after/before':>13} {'stall s':>8}"
    )
    for mode, r in results.items():
        print(f"{mode:<6} {r['tokens_per_s_before']:>13,.0f} {r['tokens_per_s_after']:>12,.0f} "
              f"{summary['after_over_before'][mode]:>13.3f} {r['save_stall_s']:>8.2f}")  # fmt: skip
    asyn = results["async"]
    print(f"async: {asyn['steps_during_async_write']} steps overlapped the writer "
          f"({asyn['async_write_s']:.2f} s); cost vs sync stall "
          f"{summary['async_stall_over_sync_stall']:.1%} (goal <= 10%)")  # fmt: skip
    machine = machine_info()
    payload = {"machine": machine, "args": {**vars(args), "out": str(args.out)},
               "results": results, "summary": summary}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if machine["gpu"] else "cpu"
    (args.out / f"checkpoint_overhead_{device}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
