"""Bytes moved by all-to-all collectives, per rank (the expert-parallel token exchange).

megatron-core's alltoall token dispatcher exchanges tokens (and router probabilities) with
``torch.distributed.all_to_all_single``, forward and backward. :func:`install` wraps that one
function to add the bytes of each call's input (sent) and output (received) to a counter;
:func:`take` reads and resets it. MoNE's neuron selection happens after dispatch, so a MoNE run
must move exactly the bytes of the same MoE run; the trainer logs both figures per step.
"""

from __future__ import annotations

import time

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


def _on_cuda_stream() -> bool:
    """Whether collectives run asynchronously on a CUDA stream (NCCL), so CUDA events time them;
    gloo's (a CPU run, on a machine with or without a GPU) return when done."""
    return dist.is_initialized() and dist.get_backend() == "nccl"


def take() -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank since the last call."""
    sent, received = _counts["sent"], _counts["received"]
    _counts["sent"] = _counts["received"] = 0
    return sent, received


# --------------------------------------------------------------- time inside collectives

# The collectives a training step runs (megatron's DDP, the token dispatcher, our reductions).
TIMED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
    "all_to_all_single", "all_to_all", "broadcast", "barrier",
)  # fmt: skip
_clock = {"seconds": 0.0, "events": [], "paused": False}
_timing = False


def install_clock() -> None:
    """Start timing every call of :data:`TIMED` (idempotent; after :func:`install`).

    On CPU (gloo) a collective returns when it is done: its wall time is what this rank spent
    waiting for and exchanging with the others. On GPU a collective is a kernel on the stream
    that spins until the peers arrive: CUDA events around it measure the same, read at
    :func:`take_collective_seconds` (one synchronisation per log interval).
    """
    global _timing
    if _timing:
        return
    import torch

    for name in TIMED:
        original = getattr(dist, name)

        def timed(*args, _original=original, **kwargs):
            if _clock["paused"]:
                return _original(*args, **kwargs)
            if _on_cuda_stream():
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                result = _original(*args, **kwargs)
                end.record()
                _clock["events"].append((start, end))
                return result
            began = time.perf_counter()
            result = _original(*args, **kwargs)
            _clock["seconds"] += time.perf_counter() - began
            return result

        setattr(dist, name, timed)
    _timing = True


def take_collective_seconds() -> float:
    """Seconds this rank spent in collectives since the last call."""
    seconds = _clock["seconds"]
    if _clock["events"]:
        import torch

        torch.cuda.synchronize()
        seconds += sum(start.elapsed_time(end) for start, end in _clock["events"]) / 1e3
    _clock["seconds"], _clock["events"] = 0.0, []
    return seconds


def pause_clock(paused: bool) -> None:
    """Stop (or restart) timing collectives: a span the caller times as a whole."""
    _clock["paused"] = paused
