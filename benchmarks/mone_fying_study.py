"""MoNE-fying a trained MoE: how much of its quality survives, and how fast it comes back.

On the `small` shape and the default corpus (CPU):

1. a MoE (rho = 1) trained for --source-steps steps: the model to MoNE-fy;
2. a dense model of the same activated size (one 512-neuron MLP per layer: the MoE's top-2 of
   256-neuron experts) trained as long, exported (mone-export) and upcycled into 8 experts of
   256 neurons, top-2 (mone-import --upcycle-experts 8 --upcycle-topk 2 --granularity 2: its
   output at step 0 is the dense model's);
3. for each seed, --steps more steps of
       moe-continued    the MoE as it is (rho = 1): the reference
       mone-fied        the MoE at rho = 0.5 (trainer.init_from)
       mone-upcycled    the upcycled dense model at rho = 0.5
       mone-scratch     rho = 0.5 from random weights
   (same data order per seed, the same held-out sample for all: data.eval_seed);
4. the step-0 losses: mone-analyze sparsify at p = 0 and 0.5 (rho = 0.5 keeps half the
   neurons) of the MoE and of the upcycled model.

Prints a table (validation loss mean +- std over seeds at every evaluation), writes
<out>/mone_fying.json and mone_fying.png. About 35 minutes on 2 CPU cores with the defaults.

    python benchmarks/mone_fying_study.py --out benchmarks/results/mone_fying_cpu_<date>
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

ARMS = ("moe-continued", "mone-fied", "mone-upcycled", "mone-scratch")


def train(run_dir: Path, *overrides: str, config_dir: Path | None = None) -> list[dict]:
    """One mone-train run (skipped when it already finished); its metric records."""
    command = [sys.executable, "-m", "mone_train.train"]
    if config_dir is not None:
        command += ["--config-dir", str(config_dir)]
    command += [*overrides, f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled"]
    print("$", " ".join(command[2:]), flush=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:  # progress bars, errors
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tool(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run([sys.executable, "-m", *command], check=True, capture_output=True)


def step_zero(model: Path, data: str, out: Path) -> dict:
    """Held-out loss at rho = 1 (p = 0) and rho = 0.5 (p = 0.5) before any more training."""
    tool("mone_train.analysis.cli", "sparsify", "--model", str(model), "--data", data,
         "--p", "0,0.5", "--max-tokens", "65536", "--seq-length", "256", "--out", str(out),
         "--overwrite", "--no-progress")  # fmt: skip
    rows = json.loads((out / "sparsify.json").read_text())["results"]
    return {f"rho={1 - row['p']:g}": row["loss"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for all")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    every = max(1, args.steps // 5)
    base = ["data.eval_seed=1234", f"trainer.eval_interval={every}",
            f"trainer.log_interval={every}", *args.overrides]  # fmt: skip
    source = out / "source-moe"
    train(source, "moe=moe", f"trainer.steps={args.source_steps}",
          f"trainer.save_interval={args.source_steps}", *base)  # fmt: skip
    dense = out / "source-dense"
    train(dense, "moe=moe", "model.num_experts=1", "model.router_topk=1",
          "model.router_pre_softmax=true", "model.moe_ffn_hidden_size=512",
          f"trainer.steps={args.source_steps}", f"trainer.save_interval={args.source_steps}",
          *base)  # fmt: skip
    upcycled = out / "upcycled"
    if not (upcycled / "COMPLETE.json").is_file():
        tool("mone_train.export.cli", str(dense), "--out", str(out / "dense-hf"), "--overwrite")
        tool("mone_train.importer.cli", str(out / "dense-hf"), "--out", str(upcycled),
             "--upcycle-experts", "8", "--upcycle-topk", "2", "--granularity", "2",
             "--overwrite")  # fmt: skip
    from mone_train.compose import compose_config
    from mone_train.data.corpus import prepare_stdlib_corpus

    cfg = compose_config([])
    corpus = prepare_stdlib_corpus(cfg.data.cache_dir, cfg.data.valid_every)
    zero = {
        "moe": step_zero(source, corpus.valid_prefix, out / "sparsify-moe"),
        "upcycled": step_zero(upcycled, corpus.valid_prefix, out / "sparsify-upcycled"),
    }
    continue_ = [f"trainer.steps={args.steps}", "optim.lr=1e-3", "optim.warmup_steps=20", *base]
    curves: dict[str, dict[int, list]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        seeded = [*continue_, f"trainer.seed={seed}"]
        runs = {
            "moe-continued": train(out / f"moe-continued-{seed}", "moe=moe",
                                   f"trainer.init_from={source}", *seeded),
            "mone-fied": train(out / f"mone-fied-{seed}", "moe=mone",
                               f"trainer.init_from={source}", *seeded),
            # the byte tokenizer the dense model was trained with (not its exported copy)
            "mone-upcycled": train(out / f"mone-upcycled-{seed}", "arch=imported", "moe=mone",
                                   "data.tokenizer.type=byte", "data.tokenizer.path=null",
                                   "data.tokenizer.eod_token=null", *seeded,
                                   config_dir=upcycled),
            "mone-scratch": train(out / f"mone-scratch-{seed}", "moe=mone", *seeded),
        }  # fmt: skip
        for arm, records in runs.items():
            for r in records:
                if "val_loss" in r:
                    curves[arm].setdefault(r["step"], []).append(r["val_loss"])
    report(args, out, zero, curves)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(args, out: Path, zero: dict, curves: dict) -> None:
    steps = sorted(next(iter(curves.values())))
    print(f"\nstep-0 held-out loss: MoE {zero['moe']['rho=1']:.4f} at rho = 1, "
          f"{zero['moe']['rho=0.5']:.4f} at rho = 0.5; upcycled dense "
          f"{zero['upcycled']['rho=1']:.4f} / {zero['upcycled']['rho=0.5']:.4f}")  # fmt: skip
    print(f"validation loss (nats/byte), mean +- std over seeds {args.seeds}")
    print(f"{'step':>6} " + " ".join(f"{arm:>17}" for arm in ARMS))
    table = {}
    for step in steps:
        cells = [_stats(curves[arm][step]) for arm in ARMS]
        table[step] = dict(zip(ARMS, cells))
        print(f"{step:>6} " + " ".join(f"{m:>10.4f} +-{s:.3f}" for m, s in cells))
    final = table[steps[-1]]
    gap_kept = final["mone-fied"][0] - final["moe-continued"][0]
    print(f"after {steps[-1]} steps: MoNE-fied - MoE {gap_kept:+.4f}; scratch - MoNE-fied "
          f"{final['mone-scratch'][0] - final['mone-fied'][0]:+.4f}; upcycled - MoNE-fied "
          f"{final['mone-upcycled'][0] - final['mone-fied'][0]:+.4f}")  # fmt: skip
    result = {"machine": machine_info(), "args": {**vars(args), "out": str(out)},
              "step_zero": zero, "validation": {str(s): v for s, v in table.items()},
              "curves": {arm: {str(s): v for s, v in c.items()} for arm, c in curves.items()}}  # fmt: skip
    (out / "mone_fying.json").write_text(json.dumps(result, indent=2))
    _plot(out / "mone_fying.png", steps, table, zero)
    print(f"wrote {out / 'mone_fying.json'}")


def _plot(path: Path, steps: list[int], table: dict, zero: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    starts = {"moe-continued": zero["moe"]["rho=1"], "mone-fied": zero["moe"]["rho=0.5"],
              "mone-upcycled": zero["upcycled"]["rho=0.5"], "mone-scratch": None}  # fmt: skip
    for arm in ARMS:
        xs = ([0] if starts[arm] else []) + steps
        means = ([starts[arm]] if starts[arm] else []) + [table[s][arm][0] for s in steps]
        stds = ([0.0] if starts[arm] else []) + [table[s][arm][1] for s in steps]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=arm)
    ax.set_xlabel("steps after the start")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("MoNE-fying a trained MoE (rho = 0.5), `small`, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
