"""The kernel package's plain-Python rules: implementation names and the kept-neuron count.

Importable without torch or triton, so configuration code can validate against them cheaply.
"""

from __future__ import annotations

import math

IMPLS = ("auto", "cpu", "reference", "triton")


def num_kept_neurons(neuron_keep_ratio: float, num_neurons: int) -> int:
    """K = round(rho * F), halves rounded up, clamped to [1, F]."""
    if not 0.0 < neuron_keep_ratio <= 1.0:
        raise ValueError(f"neuron_keep_ratio={neuron_keep_ratio} is outside (0, 1]")
    return max(1, min(num_neurons, math.floor(neuron_keep_ratio * num_neurons + 0.5)))
