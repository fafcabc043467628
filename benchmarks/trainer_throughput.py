"""Trainer tokens/s against a bare megatron-core training loop on the same model.

Contenders, built side by side in one process and stepped in turn (a few steps each, the order
rotating every round) for many rounds, so that slow drifts of a shared machine's speed fall on
all of them alike; every ratio is taken within a round (paired) and the median over rounds is
reported with its interquartile range:

    bare/moe                 megatron-core GPTModel with its own attention (DotProductAttention),
                             norms (torch.nn.RMSNorm), unfused RoPE and experts (SequentialMLP)
                             + torch AdamW, nothing else: the reference
    trainer/moe              mone-train's full loop step (DDP buffers, clipping, metrics and
                             health hooks, evaluation and checkpoint checks), moe=moe
    trainer/mone             the same with moe=mone (rho = 0.5, NG-LBL on): the default
                             `make train` model (SDPA attention, fused RMSNorm and RoPE, the
                             fused CPU MoNE kernel)
    trainer/mone-no-health   moe=mone with logging.health_metrics=false (the health metrics' cost)
    trainer/deepseek-moe,    arch=deepseek (fine-grained experts, shared expert, sigmoid router
    trainer/deepseek-mone    with loss-free balancing, dense first layer), MoE and MoNE
    trainer/deepseek_v3-moe, arch=deepseek_v3: the same with multi-head latent attention and
    trainer/deepseek_v3-mone a multi-token-prediction layer, MoE and MoNE
  with the speed-path ablations (--ablations):
    trainer/mone-megatron-attn, -torch-norm, -unfused-rope, -reference-act (the eager PyTorch
    MoNE activation), -baseline-isa (our CPU operators' x86-64 baseline loops instead of the
    best the CPU has), -grouped, and trainer/moe-grouped.

Targets: trainer/mone >= 1.2x bare (DESIGN section 4) and MoNE / MoE step time <= 1.05, on the
AVX2 path as on the AVX-512 one. Which CPU paths ran is in the JSON (`machine`): torch's
(ATEN_CPU_CAPABILITY) and our operators' (MONE_CPU_ISA; it follows torch's when unset), so
`ATEN_CPU_CAPABILITY=avx2 python benchmarks/trainer_throughput.py` measures a CPU without
AVX-512 on one that has it. Prints a table and writes
benchmarks/results/trainer_throughput_<device>-<isa>.json.

    python benchmarks/trainer_throughput.py [--rounds 24] [--steps-per-turn 4] [--ablations]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import isa_tag, machine_info  # noqa: E402

from mone_train.compose import compose_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_VS_BARE = 1.2  # trainer/mone tokens/s over the bare loop's (DESIGN section 4)
GOAL_MONE_OVER_MOE = 1.05  # MoNE / MoE step time


class Stepper:
    """A contender: ``step()`` runs one optimizer step and returns the tokens it trained on."""

    def __init__(self, name: str, step: Callable[[], int], close: Callable[[], None]):
        self.name, self.step, self.close = name, step, close


def bare_stepper(overrides: list[str]) -> Stepper:
    """A plain megatron-core forward/backward/AdamW loop on the same model."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.data.corpus import prepare_stdlib_corpus
    from mone_train.data.dataset import build_gpt_datasets, micro_batches
    from mone_train.data.tokenizer import ByteTokenizer
    from mone_train.model.builder import build_gpt_model
    from mone_train.model.lm import causal_mask

    # megatron's own attention core, norms, RoPE and experts, whatever the trainer's defaults.
    cfg = compose_config(
        ["moe=moe", *overrides, "model.attention=megatron", "model.norm=torch",
         "model.rope_fusion=false", "moe.grouped_gemm=false"]
    )  # fmt: skip
    t = cfg.trainer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = prepare_stdlib_corpus(cfg.data.cache_dir, cfg.data.valid_every)
    tokenizer = ByteTokenizer()
    train_ds, _ = build_gpt_datasets(
        corpus.train_prefix, corpus.valid_prefix, tokenizer, t.seq_length, t.seed,
        20_000 * t.global_batch_size, t.micro_batch_size,
        Path(corpus.train_prefix).parent / "index-cache",
    )  # fmt: skip
    torch.manual_seed(t.seed)
    model_parallel_cuda_manual_seed(t.seed)
    model = build_gpt_model(cfg, tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    mask = causal_mask(t.seq_length, device)
    batches = micro_batches(train_ds, 0, t.micro_batch_size, 0, 1)

    def step() -> int:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t.micro_batch_size * t.seq_length

    return Stepper("bare/moe", step, lambda: None)


def trainer_stepper(name: str, overrides: list[str], workdir: Path, info) -> Stepper:
    """mone-train's Trainer, one loop step (``Trainer.step``) at a time."""
    from tqdm import tqdm

    from mone_train.components.checkpointer import PreemptionFlag
    from mone_train.trainer import Trainer

    cfg = compose_config(
        [*overrides, "trainer.steps=1000000", "trainer.log_interval=10",
         "trainer.eval_interval=1000000", "trainer.eval_iters=1", "trainer.save_interval=0",
         f"trainer.run_dir={workdir / name.replace('/', '-')}", "logging.wandb_mode=disabled"]
    )  # fmt: skip
    preemption = PreemptionFlag()
    trainer = Trainer(cfg, info, preemption)
    batches = trainer.batches()
    trainer.model.train()
    progress = tqdm(disable=True)
    tokens = cfg.trainer.global_batch_size * cfg.trainer.seq_length

    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    # megatron's auxiliary-loss tracker is one per process, sized by the first model that
    # records into it: each contender steps with its own (models differ in layers, MTP).
    shared, own = get_moe_layer_wise_logging_tracker(), {}

    def step() -> int:
        others = dict(shared)
        shared.clear()
        shared.update(own)
        try:
            trainer.step(batches, progress)
        finally:
            own.clear()
            own.update(shared)
            shared.clear()
            shared.update(others)
        return tokens

    def close() -> None:
        trainer.close()
        preemption.restore()

    return Stepper(name, step, close)


def isa_stepper(stepper: Stepper, isa: str) -> Stepper:
    """``stepper`` with our CPU operators' loops for ``isa`` (capped by the CPU)."""
    from mone_kernels.cpu_build import using_isa

    def step() -> int:
        with using_isa(isa):
            return stepper.step()

    return Stepper(stepper.name, step, stepper.close)


def contenders(args: argparse.Namespace, workdir: Path, info) -> list[Stepper]:
    base = args.overrides

    def trainer(name: str, *extra: str) -> Stepper:
        return trainer_stepper(name, [*base, *extra], workdir, info)

    steppers = [
        bare_stepper(base),
        trainer("trainer/moe", "moe=moe"),
        trainer("trainer/mone", "moe=mone"),
        trainer("trainer/mone-no-health", "moe=mone", "logging.health_metrics=false"),
        trainer("trainer/deepseek-moe", "arch=deepseek", "moe=moe"),
        trainer("trainer/deepseek-mone", "arch=deepseek", "moe=mone"),
        trainer("trainer/deepseek_v3-moe", "arch=deepseek_v3", "moe=moe"),
        trainer("trainer/deepseek_v3-mone", "arch=deepseek_v3", "moe=mone"),
    ]
    if args.ablations:
        steppers += [
            trainer("trainer/mone-megatron-attn", "model.attention=megatron"),
            trainer("trainer/mone-torch-norm", "model.norm=torch"),
            trainer("trainer/mone-unfused-rope", "model.rope_fusion=false"),
            trainer("trainer/mone-reference-act", "moe.kernel_impl=reference"),
            isa_stepper(trainer("trainer/mone-baseline-isa"), "baseline"),
            trainer("trainer/mone-grouped", "moe.grouped_gemm=true"),
            trainer("trainer/moe-grouped", "moe=moe", "moe.grouped_gemm=true"),
        ]
    return steppers


# Paired ratios: (name, a, b) -> tokens/s of a over tokens/s of b = step time of b over a's.
EFFECTS = (
    ("MoNE / MoE step time", "trainer/moe", "trainer/mone"),
    ("MoNE / MoE step time, DeepSeek-style", "trainer/deepseek-moe", "trainer/deepseek-mone"),
    ("MoNE / MoE step time, deepseek_v3", "trainer/deepseek_v3-moe", "trainer/deepseek_v3-mone"),
    ("MoNE / MoE step time, grouped experts", "trainer/moe-grouped", "trainer/mone-grouped"),
    ("health metrics on / off, step time", "trainer/mone-no-health", "trainer/mone"),
    ("SDPA attention vs megatron's core", "trainer/mone", "trainer/mone-megatron-attn"),
    ("fused RMSNorm vs torch.nn.RMSNorm", "trainer/mone", "trainer/mone-torch-norm"),
    ("fused RoPE vs megatron's unfused", "trainer/mone", "trainer/mone-unfused-rope"),
    ("fused CPU MoNE kernel vs reference", "trainer/mone", "trainer/mone-reference-act"),
    ("best CPU ISA vs the x86-64 baseline", "trainer/mone", "trainer/mone-baseline-isa"),
    ("grouped vs sequential experts", "trainer/mone-grouped", "trainer/mone"),
)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure(steppers: list[Stepper], rounds: int, per_turn: int, warmup: int) -> dict:
    """Tokens/s of every contender in every round."""
    for stepper in steppers:  # warm-up: first-step allocations, caches, kernel builds
        for _ in range(warmup):
            stepper.step()
    rates: dict[str, list[float]] = {s.name: [] for s in steppers}
    for r in range(rounds):
        order = steppers[r % len(steppers) :] + steppers[: r % len(steppers)]
        for stepper in order:
            start, tokens = time.perf_counter(), 0
            for _ in range(per_turn):
                tokens += stepper.step()
            rates[stepper.name].append(tokens / (time.perf_counter() - start))
        done = ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items())
        print(f"round {r + 1}/{rounds}: {done}", flush=True)
    return rates


def summarise(rates: dict[str, list[float]]) -> tuple[list[dict], dict]:
    rows = []
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates["bare/moe"])]
        q1, q2, q3 = quartiles(ratios)
        rows.append({
            "contender": name, "tokens_per_s": statistics.median(values),
            "ratio_to_bare": q2, "ratio_to_bare_iqr": [q1, q3],
            "rounds_tokens_per_s": values, "rounds_ratio_to_bare": ratios,
        })  # fmt: skip
    effects = {}
    for name, num, den in EFFECTS:
        if num in rates and den in rates:
            ratios = [a / b for a, b in zip(rates[num], rates[den])]
            q1, q2, q3 = quartiles(ratios)
            effects[name] = {"ratio": q2, "iqr": [q1, q3], "rounds": ratios, "of": [num, den]}
    return rows, effects


def report(args: argparse.Namespace, rows: list[dict], effects: dict) -> None:
    """Print the table and the paired effects; write the JSON."""
    machine = machine_info()
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    paths = f"torch {machine['torch_cpu_capability']}, MoNE operators {machine['mone_cpu_isa']}"
    print(f"\nTrainer throughput, `small` model {' '.join(args.overrides)}, {where} ({paths})")
    print(f"{'contender':<30} {'tokens/s':>10} {'vs bare':>8}   (medians of {args.rounds} "
          f"paired rounds; interquartile range)")  # fmt: skip
    for row in rows:
        q1, q3 = row["ratio_to_bare_iqr"]
        print(f"{row['contender']:<30} {row['tokens_per_s']:>10,.0f} {row['ratio_to_bare']:>8.1%}"
              f"   ({q1:.1%} - {q3:.1%})")  # fmt: skip
    mone = next(row for row in rows if row["contender"] == "trainer/mone")
    print(f"goal trainer/mone >= {GOAL_VS_BARE:.1f}x bare: {mone['ratio_to_bare']:.3f}x")
    print("paired effects (median over rounds, interquartile range):")
    for name, effect in effects.items():
        q1, q3 = effect["iqr"]
        print(f"  {name:<40} {effect['ratio']:.3f}  ({q1:.3f} - {q3:.3f})")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"trainer_throughput_{device}{isa_tag(machine)}.json"
    out.write_text(json.dumps(
        {"machine": machine, "args": {**vars(args), "out": str(args.out)}, "results": rows,
         "paired_effects": effects,
         "goals": {"trainer_mone_vs_bare": GOAL_VS_BARE, "mone_over_moe": GOAL_MONE_OVER_MOE}},
        indent=2,
    ))  # fmt: skip
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--steps-per-turn", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="steps per contender, untimed")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for all")
    parser.add_argument("--ablations", action="store_true", help="add the speed-path ablations")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
    from mone_train.runtime import configure_torch

    configure_torch(compose_config(args.overrides))
    info = init_distributed(1)
    steppers = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            steppers = contenders(args, Path(tmp), info)
            rates = measure(steppers, args.rounds, args.steps_per_turn, args.warmup)
            for stepper in steppers:
                stepper.close()
    finally:
        shutdown_distributed()
    report(args, *summarise(rates))


if __name__ == "__main__":
    main()
