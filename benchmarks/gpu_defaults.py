"""Both settings of each GPU default, and the measured run against mone-plan's prediction.

Three defaults switch on with CUDA and have a CPU-tested other setting: ``moe.grouped_gemm``
(the experts as torch._grouped_mm, else expert by expert), ``trainer.compile`` (megatron's
fused functions through torch.compile) and ``moe.kernel_impl`` (``auto``: the compiled Triton
kernel on CUDA; ``reference``: plain PyTorch). On a one-GPU slice of a shipped model, MoNE in
bf16, the baseline runs with every default on and one run per default with it off (a fresh
trainer process each, benchmarks/step_time.py's), and the table says which setting is faster.
The baseline's tokens/s, MFU and peak memory are set against ``mone-plan`` for the same
slice: its predicted peak memory, and the tokens/s its assumed MFU would give.

    python benchmarks/gpu_defaults.py [--model 1b] [--layers 4] [--seq 4096] [--micro-batch 2]
        [--steps 12] [--out DIR] [--dry-run]

Prints two tables and writes gpu_defaults_<device>.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from step_time import overrides_for, run_flavour  # noqa: E402

# (config key, the GPU default, the other setting)
DEFAULTS = [
    ("moe.grouped_gemm", "true", "false"),
    ("trainer.compile", "true", "false"),
    ("moe.kernel_impl", "auto", "reference"),
]


def measure(args) -> dict:
    """{"baseline": run, key: run with that default off} (step_time.run_flavour's records)."""
    runs = {}
    base = [f"{key}={default}" for key, default, _ in DEFAULTS]
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in [("baseline", None), *[(key, other) for key, _, other in DEFAULTS]]:
            overrides = [o for o in base if change is None or not o.startswith(f"{name}=")]
            if change is not None:
                overrides.append(f"{name}={change}")
            run_args = argparse.Namespace(**{**vars(args), "overrides": overrides})
            print(f"gpu_defaults: {name} {'(all defaults on)' if change is None else change}",
                  flush=True)  # fmt: skip
            try:
                runs[name] = run_flavour(run_args, "mone", Path(tmp) / name.replace(".", "_"))
            except SystemExit as err:  # one setting that fails does not end the comparison
                runs[name] = {"error": str(err)[-2000:]}
    return runs


def plan_of(args) -> dict:
    """mone-plan's figures for the baseline slice on one device."""
    from mone_train.compose import compose_config
    from mone_train.planning.cli import vocab_size_of
    from mone_train.planning.plan import make_plan

    base = [f"{key}={default}" for key, default, _ in DEFAULTS]
    overrides = overrides_for(argparse.Namespace(**{**vars(args), "overrides": base}), "mone",
                              Path(tempfile.gettempdir()) / "gpu_defaults_plan")  # fmt: skip
    cfg = compose_config(overrides)
    plan = make_plan(cfg, vocab_size_of(cfg), world_size=1)
    return {
        "peak_memory_gib": plan.total_bytes() / 2**30,
        "assumed_mfu": plan.mfu,
        "tokens_per_s": plan.tokens_per_s_per_device,
        "flops_per_token": plan.flops.executed,
        "gpu": plan.gpu,
    }


def verdicts(runs: dict) -> list[dict]:
    """Per default: tokens/s on and off, and which is faster."""
    rows = []
    base = runs["baseline"].get("tokens_per_s")
    for key, default, other in DEFAULTS:
        off = runs[key].get("tokens_per_s")
        faster = None if base is None or off is None else (default if base >= off else other)
        rows.append({"key": key, "default": default, "other": other, "tokens_per_s_default": base,
                     "tokens_per_s_other": off, "faster": faster,
                     "error": runs[key].get("error")})  # fmt: skip
    return rows


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(rows: list[dict], runs: dict, plan: dict | None) -> None:
    print("\n| default | GPU setting tokens/s | other setting tokens/s | faster |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['key']} | {r['default']}: {_cell(r['tokens_per_s_default'], ',.0f')} | "
              f"{r['other']}: {_cell(r['tokens_per_s_other'], ',.0f')} | "
              f"{r['faster'] or 'failed: ' + (r['error'] or '?').splitlines()[-1]} |")  # fmt: skip
    base = runs["baseline"]
    if plan is None or "error" in base:
        print("\nmone-plan comparison: not available (the baseline run or the plan failed)")
        return
    print("\n| baseline slice | measured | mone-plan |")
    print("|---|---|---|")
    print(f"| tokens/s | {base['tokens_per_s']:,.0f} | {plan['tokens_per_s']:,.0f} "
          f"(at its assumed MFU {plan['assumed_mfu']:.0%}) |")  # fmt: skip
    print(f"| MFU | {_cell(base['mfu'], '.1%')} | {plan['assumed_mfu']:.1%} (assumed) |")
    print(f"| peak memory GiB | {_cell(base['peak_memory_gib'], '.2f')} | "
          f"{plan['peak_memory_gib']:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 6 steps, fp32")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.model, args.layers, args.seq, args.micro_batch, args.steps = "tiny", 2, 64, 4, 6
        args.precision = "fp32"
    runs = measure(args)
    try:
        plan = plan_of(args)
    except Exception as err:  # noqa: BLE001 - the measurements stand without the plan
        print(f"gpu_defaults: mone-plan failed: {err}")
        plan = None
    rows = verdicts(runs)
    print_tables(rows, runs, plan)
    machine = machine_info()
    device = "gpu" if machine["gpu"] else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_defaults_{device}{'_dry_run' if args.dry_run else ''}.json"
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    path.write_text(json.dumps({"machine": machine, "setup": setup, "defaults": rows,
                                "runs": runs, "plan": plan}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")
    return 0 if all(r["faster"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
