"""Process-wide torch settings a run makes before any model code runs."""

from __future__ import annotations

import torch

from mone_train.config import Config


def configure_torch(cfg: Config) -> None:
    """Intra-op threads and megatron's ``jit_fuser`` (which is torch.compile)."""
    # Set even when it is torch's default: a process that never called torch.set_num_threads
    # computes some kernels (SDPA's CPU backward among them) with other rounding than one that
    # did, and checkpoint saves set it and back (checkpoint.single_threaded_collectives), so a
    # run's numbers would otherwise depend on whether and when it saved.
    torch.set_num_threads(cfg.trainer.num_threads or torch.get_num_threads())
    import torch._dynamo as dynamo

    compile_enabled = cfg.trainer.compile
    if compile_enabled is None:
        # On CPU torch.compile buys nothing measurable here and costs 10-20 s on the first step.
        compile_enabled = torch.cuda.is_available()
    dynamo.config.disable = not compile_enabled
