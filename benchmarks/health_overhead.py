"""Cost of the health metrics per training step, measured A/B inside one process.

Separate runs on a shared machine drift by 10-20 % over minutes, more than the effect
measured here. So one model trains in alternating blocks of steps with the health monitor's
hooks installed and removed (and one ``collect()`` per monitored block, as at a log
interval); the cost is the median over block pairs of (monitored / plain) - 1.

    python benchmarks/health_overhead.py [--blocks 8] [--steps 5] [--overrides model=tiny ...]

Prints a table and writes health_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_train import silence_megatron_notices  # noqa: E402

silence_megatron_notices()
from mone_train.compose import compose_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="block pairs (plain, monitored)")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from mone_train.components.health import HealthMonitor
    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.data.dataset import micro_batches
    from mone_train.data.run_data import build_run_data
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
    from mone_train.runtime import configure_torch

    cfg = compose_config(args.overrides)
    t = cfg.trainer
    configure_torch(cfg)
    info = init_distributed(1)
    try:
        total_steps = args.warmup + 2 * args.blocks * args.steps
        samples = (total_steps * t.global_batch_size, t.micro_batch_size, t.micro_batch_size)
        data = build_run_data(cfg, info, samples)
        model, params = build_model(cfg, data.tokenizer.vocab_size)
        optimizer = build_optimizer(cfg.optim, params)
        batches = micro_batches(data.train, 0, t.micro_batch_size, 0, 1)
        mask = causal_mask(t.seq_length, info.device)
        train_step = TrainStep(
            model,
            optimizer,
            params,
            mask,
            info,
            accum=t.global_batch_size // t.micro_batch_size,
            clip_grad=cfg.optim.clip_grad,
        )

        def block(steps: int, monitor: HealthMonitor | None = None) -> float:
            """Seconds per step over ``steps`` steps (plus one log-time collect if monitored)."""
            start = time.perf_counter()
            for _ in range(steps):
                train_step(batches, cfg.optim.lr)
            if monitor is not None:
                monitor.collect()
            return (time.perf_counter() - start) / steps

        block(args.warmup)
        plain, monitored = [], []
        for i in range(args.blocks):
            for with_monitor in (False, True) if i % 2 == 0 else (True, False):
                if with_monitor:
                    monitor = HealthMonitor(model, info.ep_rank, info.device)
                    monitored.append(block(args.steps, monitor))
                    monitor.remove()
                else:
                    plain.append(block(args.steps))
    finally:
        shutdown_distributed()

    ratios = [m / p - 1 for m, p in zip(monitored, plain)]
    result = {
        "machine": machine_info(),
        "args": {**vars(args), "out": str(args.out)},
        "seconds_per_step_plain": statistics.median(plain),
        "seconds_per_step_monitored": statistics.median(monitored),
        "cost_median": statistics.median(ratios),
        "cost_per_block_pair": ratios,
    }
    print(f"health metrics overhead, {' '.join(args.overrides) or 'default model'}")
    print(f"{'':<12} {'s/step':>8}")
    print(f"{'plain':<12} {result['seconds_per_step_plain']:>8.4f}")
    print(f"{'monitored':<12} {result['seconds_per_step_monitored']:>8.4f}")
    print(
        f"cost {result['cost_median']:+.2%} (median of {len(ratios)} block pairs; "
        f"range {min(ratios):+.1%} .. {max(ratios):+.1%})"
    )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"health_overhead_{device}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
