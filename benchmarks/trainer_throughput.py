"""Trainer tokens/s against a bare megatron-core training loop on the same model.

Contenders, run in turn within each round (in a rotating order) over several rounds:

    bare/moe                 megatron-core GPTModel with its own attention (DotProductAttention),
                             norms (torch.nn.RMSNorm), unfused RoPE and experts (SequentialMLP)
                             + torch AdamW, nothing else: the reference
    trainer/moe              mone-train's full step loop (DDP buffers, clipping, logging), moe=moe
    trainer/mone             the same with moe=mone (rho = 0.5, NG-LBL on): the default
                             `make train` model (SDPA attention, fused RMSNorm and RoPE, the
                             fused CPU MoNE kernel; grouped experts with CUDA only)
    trainer/mone-no-health   moe=mone with logging.health_metrics=false (the health metrics' cost)
  with the speed-path ablations (skip them with --no-ablations):
    trainer/mone-megatron-attn   moe=mone with model.attention=megatron (what SDPA buys)
    trainer/mone-torch-norm      moe=mone with model.norm=torch (what the fused RMSNorm buys)
    trainer/mone-unfused-rope    moe=mone with model.rope_fusion=false (what the fused RoPE buys)
    trainer/mone-reference-act   moe=mone with moe.kernel_impl=reference (what the fused CPU
                                 MoNE kernel buys over the eager PyTorch reference)
    trainer/mone-grouped         moe=mone with moe.grouped_gemm=true
    trainer/mone-sequential      moe=mone with moe.grouped_gemm=false (what grouped experts buy;
                                 on CPU this is the default, so it also shows the noise floor)
    trainer/moe-grouped          moe=moe with moe.grouped_gemm=true: MoE through the same
                                 grouped experts, for the MoNE / MoE step-time ratio

Targets: trainer/mone >= 1.2x bare (issue: the GPU speed path; DESIGN section 4); the
health metrics cost a few % at most. On a shared machine the speed drifts by 10-20% over
minutes, so every ratio is taken within each round (paired) and the median over rounds is
reported beside the median tokens/s. Prints a table and writes
benchmarks/results/trainer_throughput_<device>[-<cpu isa>].json. The CPU paths measured are
torch's (ATEN_CPU_CAPABILITY) and our operators' (MONE_CPU_ISA; it follows torch's when unset):
`ATEN_CPU_CAPABILITY=avx2 python benchmarks/trainer_throughput.py` measures a CPU without
AVX-512 on one that has it.

    python benchmarks/trainer_throughput.py [--steps 60] [--rounds 2] [--no-ablations]
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
from machine import isa_tag, machine_info  # noqa: E402

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

    # megatron's own attention core and experts, whatever the trainer's defaults are.
    cfg = compose_config(
        [
            "moe=moe",
            *overrides,
            "model.attention=megatron",
            "model.norm=torch",
            "model.rope_fusion=false",
            "moe.grouped_gemm=false",
        ]
    )
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


# Paired ratios printed under the table: (name, contender a, contender b) -> tokens/s of a over
# tokens/s of b, i.e. step time of b over step time of a (above 1: a is faster).
HEALTH = "health metrics on / off, step time"
EFFECTS = (
    ("SDPA attention vs megatron's core", "trainer/mone", "trainer/mone-megatron-attn"),
    ("fused RMSNorm vs torch.nn.RMSNorm", "trainer/mone", "trainer/mone-torch-norm"),
    ("fused RoPE vs megatron's unfused", "trainer/mone", "trainer/mone-unfused-rope"),
    ("fused CPU MoNE kernel vs reference", "trainer/mone", "trainer/mone-reference-act"),
    ("grouped vs sequential experts", "trainer/mone-grouped", "trainer/mone-sequential"),
    ("MoNE / MoE step time", "trainer/moe", "trainer/mone"),
    ("MoNE / MoE step time, grouped experts", "trainer/moe-grouped", "trainer/mone-grouped"),
    (HEALTH, "trainer/mone-no-health", "trainer/mone"),
)
GOAL_VS_BARE = 1.2  # trainer/mone tokens/s over the bare loop's (DESIGN section 4)


def contenders(args: argparse.Namespace, workdir: Path) -> dict:
    """Name -> zero-argument function returning tokens/s."""
    steps, warmup, overrides = args.steps, args.warmup, args.overrides

    def mone(*extra: str):
        return lambda: trainer("mone", steps, warmup, workdir, [*overrides, *extra])

    table = {
        "bare/moe": lambda: bare_loop(steps, warmup, overrides),
        "trainer/moe": lambda: trainer("moe", steps, warmup, workdir, overrides),
        "trainer/mone": mone(),
        "trainer/mone-no-health": mone("logging.health_metrics=false"),
    }
    if args.ablations:
        table["trainer/mone-megatron-attn"] = mone("model.attention=megatron")
        table["trainer/mone-torch-norm"] = mone("model.norm=torch")
        table["trainer/mone-unfused-rope"] = mone("model.rope_fusion=false")
        table["trainer/mone-reference-act"] = mone("moe.kernel_impl=reference")
        table["trainer/mone-grouped"] = mone("moe.grouped_gemm=true")
        table["trainer/mone-sequential"] = mone("moe.grouped_gemm=false")
        table["trainer/moe-grouped"] = lambda: trainer(
            "moe", steps, warmup, workdir, [*overrides, "moe.grouped_gemm=true"]
        )
    return table


def paired_effects(results: dict[str, list[float]]) -> dict[str, dict]:
    """The EFFECTS whose contenders ran: median and per-round ratios of tokens/s."""
    effects = {}
    for name, num, den in EFFECTS:
        if num in results and den in results:
            ratios = [a / b for a, b in zip(results[num], results[den])]
            effects[name] = {
                "ratio": statistics.median(ratios),
                "best_ratio": max(results[num]) / max(results[den]),
                "rounds": ratios,
                "of": [num, den],
            }
    return effects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for all")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the logging interval)")

    with tempfile.TemporaryDirectory() as tmp:
        table = contenders(args, Path(tmp))
        names = list(table)
        results: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                results[name].append(table[name]())

    rows = []
    for name, rates in results.items():
        ratios = [rate / bare for rate, bare in zip(rates, results["bare/moe"])]
        rows.append(
            {
                "contender": name,
                "tokens_per_s": statistics.median(rates),
                "ratio_to_bare": statistics.median(ratios),
                "best_tokens_per_s": max(rates),
                "best_ratio_to_bare": max(rates) / max(results["bare/moe"]),
                "rounds_tokens_per_s": rates,
                "rounds_ratio_to_bare": ratios,
            }
        )
    effects = paired_effects(results)
    health_cost = effects[HEALTH]["ratio"] - 1.0
    report(args, rows, effects, health_cost)


def report(args: argparse.Namespace, rows: list[dict], effects: dict, health_cost: float) -> None:
    """Print the table and the paired effects; write the JSON."""
    machine = machine_info()
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    print(f"\nTrainer throughput, `small` model {' '.join(args.overrides)}, {where}")
    # Contention on a shared machine only ever slows a run down, so beside the medians of
    # paired rounds the best round of each contender is shown (ratios of bests).
    print(
        f"{'contender':<27} {'tokens/s':>10} {'vs bare':>8} {'best':>10} {'vs best bare':>13}"
        f"   (medians / bests over {args.rounds} rounds)"
    )
    for row in rows:
        print(
            f"{row['contender']:<27} {row['tokens_per_s']:>10,.0f} {row['ratio_to_bare']:>8.1%}"
            f" {row['best_tokens_per_s']:>10,.0f} {row['best_ratio_to_bare']:>13.1%}"
        )
    mone = next(row for row in rows if row["contender"] == "trainer/mone")
    print(
        f"goal trainer/mone >= {GOAL_VS_BARE:.1f}x bare: {mone['ratio_to_bare']:.2f}x paired median,"
        f" {mone['best_ratio_to_bare']:.2f}x of bests"
    )
    print("paired effects (median over rounds; ratio of bests; per-round values):")
    for name, effect in effects.items():
        rounds = ", ".join(f"{r:.3f}" for r in effect["rounds"])
        print(f"  {name:<40} {effect['ratio']:.3f}  {effect['best_ratio']:.3f}  ({rounds})")
    paired = effects[HEALTH]["rounds"]
    print(
        f"health metrics cost {health_cost:+.1%} of step time (median of paired rounds: "
        f"{', '.join(f'{p - 1:+.1%}' for p in paired)})"
    )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"trainer_throughput_{device}{isa_tag(machine)}.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": {**vars(args), "out": str(args.out)},
                "results": rows,
                "paired_effects": effects,
                "health_metrics_cost": {"median": health_cost, "rounds": [p - 1 for p in paired]},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
