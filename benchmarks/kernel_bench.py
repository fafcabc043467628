"""Benchmark the fused MoNE activation against its memory floor and its alternatives.

For every (N rows, F neurons, rho): forward and forward+backward time of

    fused        the Triton kernel on CUDA; the C++ CPU operator (mone_kernels/cpu_kernel.py)
                 without a GPU
    reference    the unfused PyTorch reference
    dense        the plain SwiGLU activation silu(gate) * up (what MoE computes)

and, for the fused kernel, achieved GB/s against the device's measured copy bandwidth (the
memory floor: bytes of fc1 read + h and the packed mask written; backward: fc1, mask and dh
read + d fc1 written; the CPU operator writes a byte-per-neuron mask, so its floor is lower
than what it moves). A full expert (fc1 GEMM + activation + fc2 GEMM, hidden D) is timed with
the MoNE activation and with the dense one: MoNE should cost at most 1.05x.

    python benchmarks/kernel_bench.py [--out DIR]          # defaults: the issue's grid, bf16

Without a GPU the fused path is the CPU operator, on small shapes in fp32, and it says so.
Prints a table, writes kernel_bench_<device>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import isa_tag, machine_info  # noqa: E402

from mone_kernels import neuron_topk_swiglu_reference, num_kept_neurons  # noqa: E402
from mone_kernels.cpu_kernel import cpu_kernel_error, neuron_topk_swiglu_cpu  # noqa: E402

CUDA = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events via triton's do_bench on GPU)."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(20, repeats * 5))
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbs(repeats: int) -> float:
    """Device copy bandwidth: bytes read + written per second by a large tensor copy."""
    numel = (1 << 28 if CUDA else 1 << 24) // 4
    src = torch.empty(numel, dtype=torch.float32, device="cuda" if CUDA else "cpu")
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _activation_fns(fc1, k, dh):
    """name -> (forward fn, forward+backward fn) for the activation alone."""
    fns = {}
    x = fc1.detach().requires_grad_()
    if CUDA:
        from mone_kernels.triton_topk_swiglu import neuron_topk_swiglu_bwd, neuron_topk_swiglu_fwd

        def fused_fb():
            _, packed = neuron_topk_swiglu_fwd(fc1, k)
            neuron_topk_swiglu_bwd(fc1, packed, dh)

        fns["fused"] = (lambda: neuron_topk_swiglu_fwd(fc1, k), fused_fb)
    elif cpu_kernel_error() is None:

        def fused_fb():
            h, _, _ = neuron_topk_swiglu_cpu(x, k)
            h.backward(dh)

        fns["fused"] = (lambda: neuron_topk_swiglu_cpu(fc1, k), fused_fb)

    def reference_fb():
        h, _, _ = neuron_topk_swiglu_reference(x, k)
        h.backward(dh)

    def dense(grad: bool):
        gate, up = (x if grad else fc1).chunk(2, dim=-1)
        h = F.silu(gate) * up
        if grad:
            h.backward(dh)

    fns["reference"] = (lambda: neuron_topk_swiglu_reference(fc1, k), reference_fb)
    fns["dense"] = (lambda: dense(False), lambda: dense(True))
    return fns


def _expert_ms(rows, neurons, hidden, k, dtype, device, repeats):
    """fwd+bwd ms of a full expert with the MoNE activation and with the dense SwiGLU."""
    from mone_kernels import neuron_topk_swiglu

    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(2 * neurons, hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
    w2 = (torch.randn(hidden, neurons, device=device, dtype=dtype) * 0.02).requires_grad_()
    dy = torch.randn(rows, hidden, device=device, dtype=dtype)

    def mone():
        h = neuron_topk_swiglu(x @ w1.t(), k).h
        (h @ w2.t()).backward(dy)

    def dense():
        gate, up = (x @ w1.t()).chunk(2, dim=-1)
        ((F.silu(gate) * up) @ w2.t()).backward(dy)

    return timed_ms(mone, repeats), timed_ms(dense, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[4096, 16384, 65536] if CUDA else [1024, 4096]
    )
    parser.add_argument(
        "--neurons", type=int, nargs="+", default=[512, 1024, 2048, 4096] if CUDA else [256, 512]
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16" if CUDA else "fp32")
    parser.add_argument(
        "--hidden", type=int, default=1024 if CUDA else 128, help="D of the full-expert timing"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = DTYPES[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    if not CUDA:
        print("No CUDA device: the fused path is the C++ CPU operator (Triton needs a GPU).")
    bandwidth = copy_bandwidth_gbs(args.repeats)
    print(f"copy bandwidth {bandwidth:,.0f} GB/s on {device}")

    rows_out = []
    header = f"{'N':>6} {'F':>5} {'rho':>5} | {'impl':<9} {'fwd ms':>8} {'fwd+bwd ms':>10} {'GB/s':>7} {'x floor':>7}"
    print(header)
    print("-" * len(header))
    for num_rows in args.rows:
        for neurons in args.neurons:
            for ratio in args.ratios:
                k = num_kept_neurons(ratio, neurons)
                fc1 = torch.randn(num_rows, 2 * neurons, device=device, dtype=dtype)
                dh = torch.randn(num_rows, neurons, device=device, dtype=dtype)
                mask_bytes = num_rows * ((neurons + 7) // 8)
                fwd_bytes = num_rows * 3 * neurons * size + mask_bytes
                bwd_bytes = num_rows * 5 * neurons * size + mask_bytes
                for impl, (fwd, fwd_bwd) in _activation_fns(fc1, k, dh).items():
                    fwd_ms, fb_ms = timed_ms(fwd, args.repeats), timed_ms(fwd_bwd, args.repeats)
                    total_bytes = fwd_bytes + bwd_bytes
                    gbs = total_bytes / (fb_ms * 1e-3) / 1e9
                    floor_ms = total_bytes / (bandwidth * 1e9) * 1e3
                    row = {
                        "rows": num_rows, "neurons": neurons, "ratio": ratio, "k": k, "impl": impl,
                        "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "gbs": gbs, "x_floor": fb_ms / floor_ms,
                    }  # fmt: skip
                    rows_out.append(row)
                    print(
                        f"{num_rows:>6} {neurons:>5} {ratio:>5.2f} | {impl:<9} {fwd_ms:>8.3f} "
                        f"{fb_ms:>10.3f} {gbs:>7.0f} {row['x_floor']:>7.2f}"
                    )
                mone_ms, dense_ms = _expert_ms(
                    num_rows, neurons, args.hidden, k, dtype, device, args.repeats
                )
                rows_out.append(
                    {"rows": num_rows, "neurons": neurons, "ratio": ratio, "k": k, "impl": "expert",
                     "mone_expert_ms": mone_ms, "dense_expert_ms": dense_ms,
                     "expert_ratio": mone_ms / dense_ms}
                )  # fmt: skip
                print(
                    f"{'':>19} | full expert (D={args.hidden}): MoNE/dense fwd+bwd = {mone_ms / dense_ms:.3f}"
                )

    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    tag = ("gpu" if CUDA else "cpu") + isa_tag(machine)
    result = {
        "machine": machine,
        "copy_bandwidth_gbs": bandwidth,
        "dtype": args.dtype,
        "hidden": args.hidden,
        "rows": rows_out,
    }
    json_path = args.out / f"kernel_bench_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2))
    fused = any(row["impl"] == "fused" for row in rows_out)
    _plot(rows_out, args.out / f"kernel_bench_{tag}.png", "fused" if fused else "reference")
    print(f"wrote {json_path}")


def _plot(rows: list[dict], path: Path, impl: str) -> None:
    """Forward+backward time relative to the memory floor, against F, one line per (N, rho)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = sorted({(r["rows"], r["ratio"]) for r in rows if r["impl"] == impl})
    for num_rows, ratio in series:
        points = sorted(
            (r["neurons"], r["x_floor"])
            for r in rows
            if r["impl"] == impl and r["rows"] == num_rows and r["ratio"] == ratio
        )
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label=f"N={num_rows}, rho={ratio}",
        )
    ax.axhline(1.25, color="grey", linestyle="--", label="target 1.25x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("F (neurons per expert)")
    ax.set_ylabel("fwd+bwd time / memory floor")
    ax.set_title(f"MoNE activation ({impl})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
