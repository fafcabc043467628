"""Decode-time cost of a MoNE expert: dense SwiGLU vs the sparse path, and generation tokens/s.

1. Expert MLP at T tokens (batch 1 and 4, all routed to the expert), for every D x F, dtype and
   keep ratio rho:

       dense    F.linear(x, fc1 [2F, D]) -> SiLU(gate) * up -> F.linear(h, fc2 [D, F])
                (the plain MoE expert: every neuron)
       sparse   mone_kernels.sparse_decode.sparse_expert_forward: the gate projection in full,
                top-K of |SiLU(gate)|, then only the kept rows of W_up and of W_down^T

   By default the weights are "cold", as in a real model's decode step, where the experts of
   all layers far exceed the caches: each call uses the next expert of a pool larger than the
   last-level cache (``--pool-mib``). ``--hot`` reuses one expert (cache-resident weights).
   Timings alternate dense and sparse call by call (warmup, then the median of ``--repeats``),
   so drift from other work on a shared machine hits both alike. The byte ceiling of the
   speedup at T = 1 is 3 / (1 + 2 rho): the sparse path reads D*F + 2*D*K weights, dense 3*D*F.

2. End to end: MoNE models (rho = 0.5) trained here unless ``--run-dir`` names a run: ``small``
   (the default CPU model, a few steps) and ``wide`` (2 layers of D x F = 1024 x 4096, one
   step), exported with mone-export, loaded with transformers and generating greedily with the
   experts forced dense (masked) and forced sparse, alternately; tokens/s after the first token
   (speedup: the median over rounds of each round's sparse/dense ratio).

    python benchmarks/decode_bench.py [--out DIR] [--run-dir RUN | --e2e small wide]
                                      [--skip-e2e] [--hot]

Prints a table, writes decode_bench_<device>_<date>.json and a PNG of speedup against rho.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_kernels.rules import num_kept_neurons  # noqa: E402
from mone_kernels.sparse_decode import sparse_expert_forward  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
E2E_STEP_KEYS = ("steps", "save_interval", "eval_interval")


def ceiling(rho: float) -> float:
    """Byte ceiling of the T = 1 speedup: dense reads 3DF weights, sparse DF + 2DK."""
    return 3.0 / (1.0 + 2.0 * rho)


def _pool(hidden: int, neurons: int, dtype: torch.dtype, pool_bytes: int) -> list[tuple]:
    """Experts (fc1 [2F, D], fc2 [D, F], fc2^T [F, D]) whose total exceeds ``pool_bytes``."""
    per_expert = 4 * hidden * neurons * torch.tensor([], dtype=dtype).element_size()
    count = max(1, math.ceil(pool_bytes / per_expert))
    pool = []
    for _ in range(count):
        fc1 = (torch.randn(2 * neurons, hidden) * 0.02).to(dtype)
        fc2 = (torch.randn(hidden, neurons) * 0.02).to(dtype)
        pool.append((fc1, fc2, fc2.t().contiguous()))
    return pool


def dense_expert(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """The plain SwiGLU expert in megatron's layout (what a MoE model computes)."""
    gate, up = F.linear(x, fc1).float().chunk(2, dim=-1)
    return F.linear((F.silu(gate) * up).to(x.dtype), fc2)


def time_pair(pool: list[tuple], tokens: int, k: int, repeats: int) -> tuple[float, float]:
    """Median ms of the dense and the sparse expert, called alternately over the pool."""
    hidden = pool[0][0].shape[1]
    x = (torch.randn(tokens, hidden) * 0.5).to(pool[0][0].dtype)
    samples: dict[str, list[float]] = {"dense": [], "sparse": []}
    calls = {
        "dense": lambda e: dense_expert(x, e[0], e[1]),
        "sparse": lambda e: sparse_expert_forward(x, e[0], e[2], k),
    }
    warmup = 3
    for i in range(warmup + repeats):
        for name, call in calls.items():
            expert = pool[(2 * i + (name == "sparse")) % len(pool)]
            start = time.perf_counter()
            call(expert)
            if i >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples["dense"]), statistics.median(samples["sparse"])


def expert_rows(args) -> list[dict]:
    """One row per (D x F, dtype, tokens, rho)."""
    rows = []
    pool_bytes = 0 if args.hot else args.pool_mib << 20
    print(f"{'D x F':>11} {'dtype':>5} {'T':>2} {'rho':>5} | {'dense ms':>9} {'sparse ms':>9} "
          f"{'speedup':>7} {'ceiling':>7}")  # fmt: skip
    for shape in args.shapes:
        hidden, neurons = (int(v) for v in shape.lower().split("x"))
        for dtype_name in args.dtypes:
            pool = _pool(hidden, neurons, DTYPES[dtype_name], pool_bytes)
            for tokens in args.batches:
                for rho in args.ratios:
                    k = num_kept_neurons(rho, neurons)
                    dense_ms, sparse_ms = time_pair(pool, tokens, k, args.repeats)
                    row = {
                        "hidden": hidden, "neurons": neurons, "dtype": dtype_name,
                        "tokens": tokens, "rho": rho, "k": k, "dense_ms": dense_ms,
                        "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                        "ceiling_t1": ceiling(rho), "pool_experts": len(pool),
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{shape:>11} {dtype_name:>5} {tokens:>2} {rho:>5.2f} | {dense_ms:>9.3f} "
                        f"{sparse_ms:>9.3f} {row['speedup']:>6.2f}x {ceiling(rho):>6.2f}x",
                        flush=True,
                    )
            del pool
    return rows


def train_run(run_dir: Path, overrides: list[str]) -> None:
    """A MoNE run (rho = 0.5) with one checkpoint at its last step."""
    cmd = [
        sys.executable, "-m", "mone_train.train", "moe=mone", "trainer.eval_iters=1",
        "logging.wandb_mode=disabled", f"trainer.run_dir={run_dir}", *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"training failed:\n{done.stderr[-3000:]}")


def e2e_overrides(name: str, steps: int) -> list[str]:
    """Training overrides of an end-to-end model: ``small`` (the default CPU model, trained
    ``steps`` steps) or ``wide`` (2 layers, D x F = 1024 x 4096, 4 experts: one step, enough
    to time decoding where the experts' weights dominate)."""
    if name == "small":
        return ["model=small", *(f"trainer.{k}={steps}" for k in E2E_STEP_KEYS)]
    return [
        "model=small", "model.hidden_size=1024", "model.num_attention_heads=8",
        "model.moe_ffn_hidden_size=4096", "model.ffn_hidden_size=4096", "model.num_layers=2",
        "model.num_experts=4", "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
        "trainer.seq_length=64", *(f"trainer.{k}=1" for k in E2E_STEP_KEYS),
    ]  # fmt: skip


def end_to_end(run_dir: Path, new_tokens: int, rounds: int) -> dict:
    """Export ``run_dir`` and generate with the experts forced dense, then sparse, alternately."""
    from transformers import AutoModelForCausalLM

    from mone_train.export.tokenizer_files import load_exported_tokenizer
    from mone_train.export.writer import export_checkpoint
    from mone_train.inference.cli import generate_text, set_decode_path

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_checkpoint(run_dir, Path(tmp) / "model")
        model = AutoModelForCausalLM.from_pretrained(exported.out, trust_remote_code=True).eval()
        tokenizer = load_exported_tokenizer(exported.out)
    speeds: dict[str, list[float]] = {"dense": [], "sparse": []}
    tokens: dict[str, list[int]] = {}
    for path in speeds:  # warm-up: first calls pay one-time set-up
        set_decode_path(model, path)
        generate_text(model, tokenizer, PROMPT, max_new_tokens=8, greedy=True)
    for _ in range(rounds):
        for path in ("dense", "sparse"):
            set_decode_path(model, path)
            stats = generate_text(model, tokenizer, PROMPT, max_new_tokens=new_tokens, greedy=True)
            speeds[path].append(stats.decode_tokens_per_s)
            tokens[path] = stats.token_ids
    result = {path: statistics.median(v) for path, v in speeds.items()}
    paired = [s / d for d, s in zip(speeds["dense"], speeds["sparse"])]  # drift cancels per round
    config = model.config
    return {
        "step": exported.step, "new_tokens": new_tokens, "rounds": rounds,
        "decode_tokens_per_s": result, "speedup": statistics.median(paired),
        "per_round": speeds,
        "same_tokens": tokens["dense"] == tokens["sparse"],
        "model": {"hidden": config.hidden_size, "neurons": config.moe_intermediate_size,
                  "num_kept": config.num_kept_neurons, "experts": config.num_experts,
                  "top_k": config.num_experts_per_tok, "layers": config.num_hidden_layers},
    }  # fmt: skip


def end_to_end_runs(args) -> dict[str, dict]:
    """End-to-end results of ``--run-dir``, or of the ``--e2e`` models trained here."""
    if args.run_dir is not None:
        return {
            "given": {
                "run_dir": str(args.run_dir),
                **end_to_end(args.run_dir, args.new_tokens, args.rounds),
            }
        }
    results = {}
    for name in args.e2e:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"training the {name} end-to-end model ...", flush=True)
            train_run(Path(tmp) / "run", e2e_overrides(name, args.train_steps))
            results[name] = end_to_end(Path(tmp) / "run", args.new_tokens, args.rounds)
        speed = results[name]["decode_tokens_per_s"]
        print(f"end to end, {name} {results[name]['model']}: dense {speed['dense']:.1f} "
              f"tokens/s, sparse {speed['sparse']:.1f} tokens/s "
              f"({results[name]['speedup']:.2f}x), same tokens: {results[name]['same_tokens']}",
              flush=True)  # fmt: skip
    return results


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup against rho, one line per (shape, dtype, T), with the T = 1 byte ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["hidden"], row["neurons"], row["dtype"], row["tokens"]), []).append(
            row
        )
    for (hidden, neurons, dtype, tokens), points in sorted(series.items()):
        points.sort(key=lambda r: r["rho"])
        ax.plot(
            [p["rho"] for p in points], [p["speedup"] for p in points],
            marker="o" if tokens == 1 else "x", linestyle="-" if tokens == 1 else ":",
            label=f"{hidden}x{neurons} {dtype} T={tokens}",
        )  # fmt: skip
    grid = [0.1 + 0.9 * i / 90 for i in range(91)]
    ax.plot(grid, [ceiling(r) for r in grid], "k--", label="byte ceiling 3/(1+2rho)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("neuron keep ratio rho")
    ax.set_ylabel("dense time / sparse time")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    """The benchmark's options (defaults: the grid in the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x4096", "2048x8192"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--hot", action="store_true", help="reuse one expert (cached weights)")
    parser.add_argument("--pool-mib", type=int, default=1024, help="cold weights: pool size")
    parser.add_argument("--run-dir", type=Path, help="a MoNE run to export (default: train)")
    parser.add_argument("--e2e", nargs="+", choices=("small", "wide"), default=["small", "wide"])
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the small model")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-e2e", action="store_true", help="expert timings only")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args()


def main() -> None:
    """Time the expert MLPs, then the end-to-end models; print, write JSON and PNG."""
    args = parse_args()
    from mone_train.export.cli import quiet_libraries

    quiet_libraries()
    machine = machine_info()
    load_before = os.getloadavg()
    weights = "hot (one expert, cache-resident)" if args.hot else f"cold ({args.pool_mib} MiB pool)"
    print(f"{machine['cpu']}, {torch.get_num_threads()} threads; weights {weights}")
    rows = expert_rows(args)
    e2e = None if args.skip_e2e else end_to_end_runs(args)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"decode_bench_{device}_{machine['date']}"
    result = {"machine": machine, "weights": "hot" if args.hot else "cold",
              "pool_mib": None if args.hot else args.pool_mib, "repeats": args.repeats,
              "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
              "expert_mlp": rows, "end_to_end": e2e}  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / f"{stem}.png", f"MoNE sparse decode vs dense expert, {machine['cpu']}, "
         f"{weights}")  # fmt: skip
    print(f"wrote {args.out / f'{stem}.json'} and {stem}.png")


if __name__ == "__main__":
    main()
