"""Describe the machine a benchmark ran on (recorded in every results JSON)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime

import torch


def machine_info() -> dict:
    """CPU model, core count, memory, GPU name if any, and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gib = None
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    # The vector instructions torch's CPU kernels and ours run (ATEN_CPU_CAPABILITY and
    # MONE_CPU_ISA cap them: one machine can measure the paths of a CPU without AVX-512).
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        from mone_kernels.cpu_build import cpu_isa, load_error

        info["mone_cpu_isa"] = cpu_isa() if load_error() is None else None
    except Exception:
        info["mone_cpu_isa"] = None
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:
        pass
    return info


def isa_tag(info: dict) -> str:
    """A results-file suffix naming the CPU instruction paths that ran ('' on a GPU), e.g.
    '-avx2' when torch and our operators both ran their AVX2 code."""
    if info.get("gpu"):
        return ""
    torch_isa = {"default": "baseline"}.get(info["torch_cpu_capability"].lower(),
                                            info["torch_cpu_capability"].lower())  # fmt: skip
    ours = info.get("mone_cpu_isa")
    if ours in (None, torch_isa):
        return f"-{torch_isa}"
    return f"-torch-{torch_isa}-mone-{ours}"
