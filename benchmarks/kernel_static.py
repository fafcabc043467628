"""What the compiler reports for the fused MoNE kernels on sm_80 / sm_90, without a GPU.

For every (arch, F, dtype) each kernel is compiled with the block sizes and warps its launcher
picks, and the table gives registers per thread, stack bytes (spills), shared memory per CTA,
resident warps per SM and the HBM byte floor per row; then it checks the performance targets
(forward >= 16 and backward >= 32 resident warps per SM for F <= 4096, no spills up to
F = 8192). The compile-and-measure code lives in ``mone_kernels.static_check``.

    python benchmarks/kernel_static.py [--archs 80 90] [--neurons 256 4096] [--dtypes bf16]
                                       [--kernels forward backward] [--out DIR] [--check]

Writes kernel_static_<date>.json and kernel_static_<date>.md to --out. With --check the exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_kernels import static_check  # noqa: E402

# tiny 128, small 256, 1b 1024 are the shipped configs' F; the rest brackets them.
DEFAULT_NEURONS = [128, 256, 1024, 2048, 4096, 8192, 16384]
KERNELS = ["forward", "backward", "backward+lbl", "lbl-count", "lbl-share"]
COLUMNS = ["kernel", "arch", "dtype", "F", "warps", "tile", "regs", "stack", "smem", "warps/SM",
           "B/row"]  # fmt: skip


def _row(u: static_check.KernelUsage) -> list[str]:
    c = u.constexprs
    # rows x neurons per CTA tile (BLOCK_B counts mask bytes: 8 neurons each)
    tile = f"{c.get('BLOCK_N', c.get('BLOCK_R'))}x{c.get('BLOCK_F', 8 * c.get('BLOCK_B', 0))}"
    return [
        u.kernel, f"sm_{u.arch}", u.dtype, str(u.num_neurons), str(u.num_warps), tile,
        str(u.regs), str(u.stack_bytes), str(u.smem_bytes), str(u.warps_per_sm),
        str(u.bytes_per_row),
    ]  # fmt: skip


def format_table(usages: list[static_check.KernelUsage]) -> str:
    """Fixed-width text table, one line per compiled kernel."""
    rows = [COLUMNS] + [_row(u) for u in usages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(usages: list[static_check.KernelUsage], failures: list[str], info: dict) -> str:
    """The same table in Markdown, with the machine, the toolchain and the target check."""
    lines = [
        f"# Fused MoNE kernels: compiler-reported resources ({info['date']})",
        "",
        f"Compiled on {info['cpu']} (no GPU needed) with triton {info['triton']}; "
        "registers, stack and shared memory from cuobjdump, resident warps per SM from the "
        "occupancy rules. B/row: HBM bytes read + written per row (the floor).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_row(u)) + " |" for u in usages]
    lines.append("")
    if failures:
        lines += ["Targets missed:", ""] + [f"- {line}" for line in failures]
    else:
        lines.append("All targets met: forward >= 16 and backward >= 32 resident warps per SM "
                     "for F <= 4096, no stack (spills) up to F = 8192.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, nargs="+", default=sorted(static_check.ARCHS))
    parser.add_argument("--neurons", type=int, nargs="+", default=DEFAULT_NEURONS)
    parser.add_argument(
        "--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"]
    )
    parser.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--date", help="date in the file names (default: today)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    unknown = set(args.archs) - set(static_check.ARCHS)
    if unknown:
        parser.error(f"--archs {sorted(unknown)}: known are {sorted(static_check.ARCHS)}")

    import triton

    info = {**machine_info(), "triton": triton.__version__}
    date = args.date or info["date"]
    usages = static_check.measure_all(args.neurons, args.dtypes, args.archs, args.kernels)
    failures = static_check.goal_failures(usages)
    print(format_table(usages))
    print("\n".join(["targets missed:", *failures]) if failures else "all targets met")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "targets": {
            "min_warps_per_sm": static_check.MIN_WARPS_PER_SM,
            "occupancy_max_neurons": static_check.OCCUPANCY_MAX_NEURONS,
            "no_spill_max_neurons": static_check.NO_SPILL_MAX_NEURONS,
        },
        "arch_limits": {f"sm_{a}": vars(limits) for a, limits in static_check.ARCHS.items()},
        "failures": failures,
        "kernels": [u.as_dict() for u in usages],
    }
    json_path = args.out / f"kernel_static_{date}.json"
    json_path.write_text(json.dumps(result, indent=2))
    (args.out / f"kernel_static_{date}.md").write_text(format_markdown(usages, failures, info))
    print(f"wrote {json_path} and its .md")
    if args.check and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
