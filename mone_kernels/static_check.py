"""What the compiler reports for the MoNE kernels on sm_80 / sm_90, without a GPU.

Triton compiles for a named GPU target on any machine, and the ``ptxas`` and ``cuobjdump``
that ship inside the triton wheel turn the result into a cubin and its resource usage:
registers per thread, stack bytes (register spills and local arrays) and shared memory. From
those and the warps per CTA, :func:`resident_warps` computes how many warps fit on one SM the
way the CUDA occupancy calculator does. Every kernel is compiled with the block sizes and
warp counts its launcher would pick (``forward_config`` and friends), so the figures describe
what actually launches.

Compiling needs a process where ``TRITON_INTERPRET`` was not set when triton was imported
(with it, the kernels and triton's own library functions are interpreter objects), so
:func:`measure_all` runs ``python -m mone_kernels.static_check`` in a clean child process
when it finds itself under the interpreter, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mone_kernels import triton_topk_swiglu as kernels

_PTR_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_RESERVED_SMEM_PER_CTA = 1024  # sm_80 and later keep 1 KiB of shared memory per CTA for the system


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability (CUDA programming guide, occupancy table)."""

    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in chunks of 256
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024


ARCHS = {
    80: ArchLimits(smem_per_sm=164 * 1024),
    90: ArchLimits(smem_per_sm=228 * 1024),
}


@dataclass
class KernelUsage:
    """One compiled kernel: launch shape, resources, occupancy and the HBM byte floor."""

    kernel: str
    arch: int
    dtype: str
    num_neurons: int
    num_warps: int
    constexprs: dict
    regs: int
    stack_bytes: int
    smem_bytes: int
    warps_per_sm: int
    bytes_per_row: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def resident_warps(regs: int, smem_bytes: int, num_warps: int, limits: ArchLimits) -> int:
    """Warps of one kernel resident per SM, limited by registers, shared memory, CTAs, warps."""
    regs_per_warp = math.ceil(regs * 32 / limits.reg_alloc_unit) * limits.reg_alloc_unit
    ctas_by_regs = (limits.regs_per_sm // max(regs_per_warp, 1)) // num_warps
    ctas_by_warps = limits.max_warps_per_sm // num_warps
    ctas_by_smem = limits.smem_per_sm // max(smem_bytes, 1)
    ctas = min(ctas_by_regs, ctas_by_warps, ctas_by_smem, limits.max_ctas_per_sm)
    return ctas * num_warps


def compile_kernel(
    kernel, arg_types: dict, int_values: dict, config: kernels.LaunchConfig, arch: int
):
    """Compile ``kernel`` as launched with ``config`` for ``sm_<arch>``.

    Returns Triton's compiled kernel (``asm`` holds the PTX and the cubin).

    ``arg_types`` maps pointer arguments to Triton types (``*bf16``); other arguments are
    int32 unless in ``constexprs``. ``int_values`` gives the value an int argument would have
    at launch, so that it gets the same divisible-by-16 specialisation as a real launch
    (pointers from torch allocations are always 16-byte aligned).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreting():
        raise RuntimeError("compiling needs a process without TRITON_INTERPRET: see measure_all")
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in config.constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = arg_types.get(name, "i32")
        value = int_values.get(name)
        if name in arg_types or (value is not None and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, config.constexprs, attrs)
    options = {"num_warps": config.num_warps}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _interpreting() -> bool:
    """Whether the kernels in this process are interpreter objects."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernels._mone_fwd_kernel, JITFunction)


def resource_usage(cubin: bytes) -> dict:
    """``{"regs", "stack", "shared"}`` of the one kernel in ``cubin``, read by cuobjdump."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    regs, stack, shared = (int(v) for v in found.groups())
    return {"regs": regs, "stack": stack, "shared": shared}


@dataclass(frozen=True)
class KernelSpec:
    """How one kernel launches for rows of F neurons: its config and HBM bytes per row."""

    name: str
    kernel: object
    config: kernels.LaunchConfig
    bytes_per_row: int


# Pointer arguments hold the storage dtype unless named here.
_FIXED_PTR_TYPES = {
    "mask_ptr": "*u8",
    "offsets_ptr": "*i32",
    "expert_ptr": "*i32",
    "weight_ptr": "*fp32",
    "counts_ptr": "*fp32",
    "sums_ptr": "*fp32",
    "shares_ptr": "*fp32",
    "coef_ptr": "*fp32",
}


def kernel_specs(num_neurons: int, dtype: str) -> list[KernelSpec]:
    """The launches of one training step for rows of ``num_neurons`` stored in ``dtype``.

    ``bytes_per_row`` is the HBM floor: what each row must read and write at least (the
    [E, F] counts of the balance loss are per expert, not per row, and live in L2).
    """
    size, f, b = _ELEMENT_BYTES[dtype], num_neurons, (num_neurons + 7) // 8
    bwd_bytes = 5 * f * size + b  # read fc1, dh, mask; write d fc1
    return [
        KernelSpec(
            "forward", kernels._mone_fwd_kernel, kernels.forward_config(f), 3 * f * size + b
        ),
        # the neuron-level balance: + the row's expert index (its weights row stays in L2)
        KernelSpec(
            "forward+bias",
            kernels._mone_fwd_kernel,
            kernels.forward_config(f, weighted=True),
            3 * f * size + b + 4,
        ),
        KernelSpec(
            "backward", kernels._mone_bwd_kernel, kernels.backward_config(f, False), bwd_bytes
        ),
        # + the row's expert index, share and loss weight
        KernelSpec(
            "backward+lbl",
            kernels._mone_bwd_kernel,
            kernels.backward_config(f, True),
            bwd_bytes + 12,
        ),
        KernelSpec("lbl-count", kernels._mone_count_kernel, kernels.count_config(f), b),
        # read the gate half and the expert index, write s_t and the share
        KernelSpec("lbl-share", kernels._mone_share_kernel, kernels.share_config(f), f * size + 12),
    ]


def _launch_ints(num_neurons: int) -> dict:
    """Values of the int arguments at launch that decide Triton's divisibility hints."""
    f, b = num_neurons, (num_neurons + 7) // 8
    return {
        "num_neurons": f, "stride_fc1": 2 * f, "stride_h": f, "stride_dh": f,
        "stride_mask": b, "stride_dfc1": 2 * f, "stride_counts": f, "stride_weight": f,
    }  # fmt: skip


def measure(spec: KernelSpec, num_neurons: int, dtype: str, arch: int) -> KernelUsage:
    """Compile one kernel spec for ``sm_<arch>`` and report its resources and occupancy."""
    config = spec.config
    arg_types = {
        name: _FIXED_PTR_TYPES.get(name, _PTR_TYPES[dtype])
        for name in spec.kernel.arg_names
        if name.endswith("_ptr")
    }
    compiled = compile_kernel(spec.kernel, arg_types, _launch_ints(num_neurons), config, arch)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton's shared memory is dynamic (metadata.shared); the cubin's static figure is the
    # per-CTA system reservation on sm_90 and 0 on sm_80, so count the reservation once.
    smem = compiled.metadata.shared + max(usage["shared"], _RESERVED_SMEM_PER_CTA)
    return KernelUsage(
        kernel=spec.name,
        arch=arch,
        dtype=dtype,
        num_neurons=num_neurons,
        num_warps=config.num_warps,
        constexprs=dict(config.constexprs),
        regs=usage["regs"],
        stack_bytes=usage["stack"],
        smem_bytes=smem,
        warps_per_sm=resident_warps(usage["regs"], smem, config.num_warps, ARCHS[arch]),
        bytes_per_row=spec.bytes_per_row,
    )


def measure_all(
    neurons: Iterable[int],
    dtypes: Iterable[str],
    archs: Iterable[int],
    kernel_names: Iterable[str] | None = None,
) -> list[KernelUsage]:
    """:func:`measure` every kernel of :func:`kernel_specs` (or those named) over the grid.

    Under the Triton interpreter this runs in a child process without it (one for the grid).
    """
    neurons, dtypes, archs = list(neurons), list(dtypes), list(archs)
    names = list(kernel_names) if kernel_names is not None else None
    if _interpreting():
        return _measure_in_child(neurons, dtypes, archs, names)
    return [
        measure(spec, num_neurons, dtype, arch)
        for arch in archs
        for dtype in dtypes
        for num_neurons in neurons
        for spec in kernel_specs(num_neurons, dtype)
        if names is None or spec.name in names
    ]


def _measure_in_child(
    neurons: list[int], dtypes: list[str], archs: list[int], names: list[str] | None
) -> list[KernelUsage]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "mone_kernels.static_check", "--neurons", *map(str, neurons),
               "--dtypes", *dtypes, "--archs", *map(str, archs)]  # fmt: skip
    if names is not None:
        command += ["--kernels", *names]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"static check child process failed:\n{child.stderr[-4000:]}")
    return [KernelUsage(**row) for row in json.loads(child.stdout)]


# The performance targets (docs: design notes, section 4): resident warps per SM for F <= 4096
# (the forward needs whole rows, so it is held to less than the streaming kernels), and no
# stack (spills) up to F = 8192.
MIN_WARPS_PER_SM = {
    "forward": 16,
    "backward": 32,
    "backward+lbl": 32,
    "lbl-count": 32,
    "lbl-share": 32,
}
OCCUPANCY_MAX_NEURONS = 4096
NO_SPILL_MAX_NEURONS = 8192


def goal_failures(usages: list[KernelUsage]) -> list[str]:
    """One line per kernel that misses the occupancy or the no-spill target; empty if none."""
    failures = []
    for u in usages:
        where = f"{u.kernel} sm_{u.arch} {u.dtype} F={u.num_neurons}"
        need = MIN_WARPS_PER_SM.get(u.kernel, 0)
        if u.num_neurons <= OCCUPANCY_MAX_NEURONS and u.warps_per_sm < need:
            failures.append(f"{where}: {u.warps_per_sm} resident warps/SM < {need}")
        if u.num_neurons <= NO_SPILL_MAX_NEURONS and u.stack_bytes:
            failures.append(f"{where}: {u.stack_bytes} stack bytes (spills)")
    return failures


def main() -> None:
    """Print :func:`measure_all`'s results as JSON (the child process of :func:`measure_all`)."""
    parser = argparse.ArgumentParser(description="compile the MoNE kernels, print JSON")
    parser.add_argument("--neurons", type=int, nargs="+", required=True)
    parser.add_argument("--dtypes", nargs="+", required=True, choices=sorted(_PTR_TYPES))
    parser.add_argument("--archs", type=int, nargs="+", required=True, choices=sorted(ARCHS))
    parser.add_argument("--kernels", nargs="+")
    args = parser.parse_args()
    usages = measure_all(args.neurons, args.dtypes, args.archs, args.kernels)
    print(json.dumps([u.as_dict() for u in usages]))


if __name__ == "__main__":
    main()
