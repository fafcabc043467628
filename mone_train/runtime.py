"""Process-wide torch settings a run makes before any model code runs."""

from __future__ import annotations

import os

import torch

from mone_train.config import Config
from mone_train.parallel.process_groups import run_device


def configure_torch(cfg: Config) -> None:
    """Intra-op threads and megatron's ``jit_fuser`` (which is torch.compile)."""
    # Set even when it is torch's default: a process that never called torch.set_num_threads
    # computes some kernels (SDPA's CPU backward among them) with other rounding than one that
    # did, and checkpoint saves set it and back (checkpoint.single_threaded_collectives), so a
    # run's numbers would otherwise depend on whether and when it saved.
    cpu = run_device(cfg.trainer.device) == "cpu"
    torch.set_num_threads(cfg.trainer.num_threads or default_threads(cpu, dict(os.environ)))
    import torch._dynamo as dynamo

    compile_enabled = cfg.trainer.compile
    if compile_enabled is None:
        # On CPU torch.compile buys nothing measurable here and costs 10-20 s on the first step.
        compile_enabled = run_device(cfg.trainer.device) == "cuda"
    dynamo.config.disable = not compile_enabled


def default_threads(cpu: bool, env: dict[str, str]) -> int:
    """Intra-op threads when ``trainer.num_threads`` is null: torch's default (one per core, or
    OMP_NUM_THREADS) for a process alone on its machine; on the CPU, the machine's cores shared
    among its processes (LOCAL_WORLD_SIZE, as torchrun and our launchers set it, or SLURM's tasks
    per node) -- several processes with a thread per core each oversubscribe it (2 processes on
    2 cores run a tiny job ~3x slower)."""
    if not cpu or "OMP_NUM_THREADS" in env:
        return torch.get_num_threads()
    local = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, torch.get_num_threads() // processes)


def check_kernel_impl(cfg: Config) -> None:
    """A forced ``moe.kernel_impl`` this machine cannot run is a config error before any work
    (rather than a traceback at the first MoNE forward)."""
    from mone_kernels.cpu_kernel import cpu_kernel_error
    from mone_kernels.triton_topk_swiglu import triton_runnable
    from mone_train.errors import ConfigError

    impl = cfg.moe.kernel_impl
    device = torch.device(run_device(cfg.trainer.device))
    if impl == "triton" and not triton_runnable(device):
        raise ConfigError(
            "moe.kernel_impl=triton is invalid on this machine: the Triton kernel needs a CUDA "
            "device (use auto, which picks the CPU operator here, or reference)"
        )
    if impl == "cpu" and (device.type != "cpu" or cpu_kernel_error() is not None):
        why = "it takes CPU tensors" if device.type != "cpu" else cpu_kernel_error()
        raise ConfigError(f"moe.kernel_impl=cpu is invalid on this machine: {why}")
