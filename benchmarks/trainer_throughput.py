"""Trainer tokens/s against a bare megatron-core training loop on the same model.

Three contenders, run in turn within each round (in a rotating order) over several rounds:

    bare       megatron-core GPTModel (its own SequentialMLP experts) + torch AdamW, nothing else
    trainer    mone-train's full step loop (DDP buffers, clipping, logging) with moe=moe
    trainer    the same with moe=mone (rho = 0.5, NG-LBL on): the default `make train` model
    trainer    moe=mone with logging.health_metrics=false (the cost of the health metrics)

Targets (issue: walking skeleton): trainer/moe >= 90% and trainer/mone >= 85% of bare; the
health metrics (expert load, neuron utilisation, |SiLU(gate)| quantiles) cost a few % at most.
On a shared machine the speed drifts by 10-20% over minutes, so the ratio to bare is taken
within each round (paired) and the median over rounds is reported beside the median tokens/s.
Prints a table and writes benchmarks/results/trainer_throughput_<device>.json.

    python benchmarks/trainer_throughput.py [--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_train.preflight import compose_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bare_loop(steps: int, warmup: int, overrides: list[str]) -> float:
    """Tokens/s of a plain megatron-core forward/backward/AdamW loop on the same model."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.data.corpus import prepare_stdlib_corpus
    from mone_train.data.dataset import build_gpt_datasets, micro_batches
    from mone_train.data.tokenizer import ByteTokenizer
    from mone_train.distributed import init_distributed, shutdown_distributed
    from mone_train.model.builder import build_gpt_model
    from mone_train.model.lm import causal_mask
    from mone_train.runtime import configure_torch

    cfg = compose_config(["moe=moe", *overrides])
    t = cfg.trainer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_torch(cfg)
    init_distributed(1)
    try:
        corpus = prepare_stdlib_corpus(cfg.data.cache_dir, cfg.data.valid_every)
        tokenizer = ByteTokenizer()
        train_ds, _ = build_gpt_datasets(
            corpus.train_prefix,
            corpus.valid_prefix,
            tokenizer,
            t.seq_length,
            t.seed,
            steps * t.global_batch_size,
            t.micro_batch_size,
            Path(corpus.train_prefix).parent / "index-cache",
        )
        torch.manual_seed(t.seed)
        model_parallel_cuda_manual_seed(t.seed)
        model = build_gpt_model(cfg, tokenizer.vocab_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
        mask = causal_mask(t.seq_length, device)
        batches = micro_batches(train_ds, 0, t.micro_batch_size, 0, 1)
        for step in range(steps):
            if step == warmup:
                start = time.perf_counter()
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
            loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        return (steps - warmup) * t.micro_batch_size * t.seq_length / elapsed
    finally:
        shutdown_distributed()


def trainer(flavour: str, steps: int, warmup: int, workdir: Path, overrides: list[str]) -> float:
    """Tokens/s that mone-train's own log reports after the first interval."""
    from mone_train.trainer import run

    run_dir = workdir / f"{flavour}-{time.monotonic_ns()}"
    cfg = compose_config(
        [
            f"moe={flavour}",
            f"trainer.steps={steps}",
            f"trainer.log_interval={warmup}",
            f"trainer.eval_interval={steps}",
            "trainer.eval_iters=1",
            f"trainer.run_dir={run_dir}",
            "logging.wandb_mode=disabled",
            *overrides,
        ]
    )
    run(cfg)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for all three")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the logging interval)")

    contenders = {
        "bare/moe": lambda: bare_loop(args.steps, args.warmup, args.overrides),
        "trainer/moe": lambda: trainer("moe", args.steps, args.warmup, workdir, args.overrides),
        "trainer/mone": lambda: trainer("mone", args.steps, args.warmup, workdir, args.overrides),
        "trainer/mone-no-health": lambda: trainer(
            "mone",
            args.steps,
            args.warmup,
            workdir,
            [*args.overrides, "logging.health_metrics=false"],
        ),
    }
    names = list(contenders)
    results: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                results[name].append(contenders[name]())

    rows = []
    for name, rates in results.items():
        ratios = [rate / bare for rate, bare in zip(rates, results["bare/moe"])]
        rows.append(
            {
                "contender": name,
                "tokens_per_s": statistics.median(rates),
                "ratio_to_bare": statistics.median(ratios),
                "rounds_tokens_per_s": rates,
                "rounds_ratio_to_bare": ratios,
            }
        )
    paired = [
        off / on for on, off in zip(results["trainer/mone"], results["trainer/mone-no-health"])
    ]
    health_cost = statistics.median(paired) - 1.0
    machine = machine_info()
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    print(f"\nTrainer throughput, `small` model {' '.join(args.overrides)}, {where}")
    print(
        f"{'contender':<24} {'tokens/s':>10} {'vs bare':>8}   (medians over {args.rounds} rounds)"
    )
    for row in rows:
        print(f"{row['contender']:<24} {row['tokens_per_s']:>10,.0f} {row['ratio_to_bare']:>8.1%}")
    print(
        f"health metrics cost {health_cost:+.1%} of step time (median of paired rounds: "
        f"{', '.join(f'{p - 1:+.1%}' for p in paired)})"
    )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"trainer_throughput_{device}.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": {**vars(args), "out": str(args.out)},
                "results": rows,
                "health_metrics_cost": {"median": health_cost, "rounds": [p - 1 for p in paired]},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
