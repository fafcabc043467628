"""Grouped-GEMM efficiency at 8, 16 and 32 local experts of the published runs' expert sizes.

The layout search's small-expert term (mone_train/planning/layout_search.py) needs how well
``torch._grouped_mm`` (mone-train's grouped experts) runs when a device holds many small
experts. For each published run's expert (hidden D, expert FFN F: the shapes of
benchmarks/layout_search_published.py) and E local experts, fc1 of all of them in one grouped
GEMM (rows per expert x D -> 2F, forward) is timed, and its TFLOP/s is set against the
device's dense bf16 peak (mone_train/hardware.py) and against one dense GEMM of the same
FLOPs (rows x E, D -> 2F): the share a layout with E local experts keeps.

    python benchmarks/gpu_grouped_gemm.py [--rows-per-expert 2048] [--out DIR] [--dry-run]

Prints a table and writes gpu_grouped_gemm_<device>.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import timed_ms  # noqa: E402  (median ms; CUDA events on a GPU)
from machine import machine_info  # noqa: E402

# (run, hidden D, expert FFN F) as benchmarks/layout_search_published.py lists them
EXPERTS = [
    ("Mixtral-8x22B", 6144, 16384),
    ("Mixtral-8x7B", 4096, 14336),
    ("Qwen2-57B-A14B", 3584, 2560),
    ("DeepSeek-V3", 7168, 2048),
    ("Qwen3-235B-A22B", 4096, 1536),
    ("Qwen3-30B-A3B", 2048, 768),
]
LOCAL_EXPERTS = (8, 16, 32)
CUDA = torch.cuda.is_available()


def measure(hidden: int, ffn: int, experts: int, rows: int, dtype, repeats: int) -> dict:
    """TFLOP/s of the grouped fc1 and of one dense GEMM of the same FLOPs."""
    device = "cuda" if CUDA else "cpu"
    x_ND = torch.randn(rows * experts, hidden, device=device, dtype=dtype)
    w_EOD = torch.randn(experts, 2 * ffn, hidden, device=device, dtype=dtype) / hidden**0.5
    ends_E = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * rows
    w_dense = torch.randn(2 * ffn, hidden, device=device, dtype=dtype) / hidden**0.5
    grouped = timed_ms(lambda: torch._grouped_mm(x_ND, w_EOD.transpose(1, 2), offs=ends_E), repeats)
    dense = timed_ms(lambda: x_ND @ w_dense.T, repeats)
    flops = 2.0 * rows * experts * hidden * 2 * ffn
    return {
        "grouped_ms": grouped,
        "dense_ms": dense,
        "grouped_tflops": flops / grouped / 1e9,
        "dense_tflops": flops / dense / 1e9,
        "grouped_over_dense": dense / grouped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-expert", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--dry-run", action="store_true", help="shapes / 64, fp32 (CPU check)")
    args = parser.parse_args(argv)
    scale, dtype = (64, torch.float32) if args.dry_run or not CUDA else (1, torch.bfloat16)
    rows = max(1, args.rows_per_expert // scale)
    peak = None
    if CUDA:
        from mone_train.hardware import peak_tflops

        peak = peak_tflops(torch.cuda.get_device_name(), "bf16")
    results = []
    for run, hidden, ffn in EXPERTS:
        for experts in LOCAL_EXPERTS:
            try:
                r = measure(hidden // scale, ffn // scale, experts, rows, dtype, args.repeats)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                r = {"error": str(err).splitlines()[0]}
            r.update(run=run, hidden=hidden // scale, ffn=ffn // scale, local_experts=experts)
            if peak and "error" not in r:
                r["grouped_share_of_peak"] = r["grouped_tflops"] / peak
            results.append(r)
    print(f"\ngrouped fc1 (D -> 2F), {rows} rows per expert, {str(dtype)[6:]}"
          f"{f', peak {peak:.0f} TFLOP/s' if peak else ''}")  # fmt: skip
    print("| run | D | F | local experts | grouped TFLOP/s | dense TFLOP/s | grouped/dense | "
          "share of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['run']} | {r['hidden']} | {r['ffn']} | {r['local_experts']} | "
                  f"failed: {r['error']} | | | |")  # fmt: skip
            continue
        share = r.get("grouped_share_of_peak")
        print(f"| {r['run']} | {r['hidden']} | {r['ffn']} | {r['local_experts']} | "
              f"{r['grouped_tflops']:.3g} | {r['dense_tflops']:.3g} | "
              f"{r['grouped_over_dense']:.2f} | {'-' if share is None else f'{share:.1%}'} |")  # fmt: skip
    machine = machine_info()
    device = "gpu" if machine["gpu"] else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_grouped_gemm_{device}{'_dry_run' if args.dry_run else ''}.json"
    setup = {"rows_per_expert": rows, "dtype": str(dtype), "scale": scale, "peak_tflops": peak}
    path.write_text(json.dumps({"machine": machine, "setup": setup, "results": results},
                               indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
