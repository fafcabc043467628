"""The same weights at another keep ratio: every MoNE experts module's K, and nothing else.

K = round(rho x F) is the one number a MoNE expert derives from its keep ratio
(:class:`mone_train.model.mone_experts.MoNEExperts`); evaluating at rho sets it for the duration
of a ``with`` block and puts the trained K back after. Plain MoE experts keep every neuron, so
they have no other ratio to run at.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mone_kernels import num_kept_neurons
from mone_train.evaluation.errors import EvaluationError
from mone_train.model.mone_experts import MoNEExperts


def check_keep_ratios(ratios: list[float], flavour: str, key: str = "evaluation.keep_ratios"):
    """Each ratio in (0, 1]; ratios below 1 need MoNE experts (plain MoE keeps all neurons)."""
    for ratio in ratios:
        if not 0.0 < ratio <= 1.0:
            raise EvaluationError(f"{key}={list(ratios)} is invalid: expected ratios in (0, 1]")
        if ratio < 1.0 and flavour != "mone":
            raise EvaluationError(
                f"{key}={list(ratios)} is invalid for moe={flavour}: plain experts keep every "
                "neuron (expected [] or [1.0], or a MoNE model)"
            )


def ratio_label(ratio: float) -> str:
    """How a keep ratio appears in metric names: ``rho0.5``."""
    return f"rho{ratio:g}"


@contextmanager
def keep_ratio(model: torch.nn.Module, ratio: float | None) -> Iterator[None]:
    """Run ``model``'s MoNE experts at keep ratio ``ratio`` inside the block (None: as trained)."""
    experts = [m for m in model.modules() if isinstance(m, MoNEExperts)]
    trained = [m.num_kept for m in experts]
    try:
        if ratio is not None:
            for module in experts:
                module.num_kept = num_kept_neurons(ratio, module.num_neurons)
        yield
    finally:
        for module, k in zip(experts, trained):
            module.num_kept = k
