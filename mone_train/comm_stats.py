"""Bytes moved by all-to-all collectives, per rank (the expert-parallel token exchange).

megatron-core's alltoall token dispatcher exchanges tokens (and router probabilities) with
``torch.distributed.all_to_all_single``, forward and backward. :func:`install` wraps that one
function to add the bytes of each call's input (sent) and output (received) to a counter;
:func:`take` reads and resets it. MoNE's neuron selection happens after dispatch, so a MoNE run
must move exactly the bytes of the same MoE run; the trainer logs both figures per step.
"""

from __future__ import annotations

import torch.distributed as dist

_counts = {"sent": 0, "received": 0}
_installed = False


def install() -> None:
    """Start counting (idempotent)."""
    global _installed
    if _installed:
        return
    original = dist.all_to_all_single

    def all_to_all_single(output, input, *args, **kwargs):
        _counts["sent"] += input.numel() * input.element_size()
        _counts["received"] += output.numel() * output.element_size()
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = all_to_all_single
    _installed = True


def take() -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank since the last call."""
    sent, received = _counts["sent"], _counts["received"]
    _counts["sent"] = _counts["received"] = 0
    return sent, received
