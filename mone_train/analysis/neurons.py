"""What the expert hooks do to the neurons of every activated expert: keep the top K, record |g|.

Both model families (our checkpoints, Hugging Face models) hook their routed experts so that, for
each expert's rows, the gate activation ``g = act(W_gate x)`` passes through one
:class:`NeuronControl`. It holds the study's setting (the keep ratio, or none for the model's own
computation), an optional recorder of ``|g|``, and a tally of how many neurons each row kept,
which the studies report as measured (not assumed) numbers.

Legend: T rows (tokens routed to one expert), F neurons per expert, K kept neurons per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mone_kernels import neuron_topk_mask, num_kept_neurons

# record(layer, expert, g_abs_TF): layer is the 0-based decoder layer, expert its global index.
Recorder = Callable[[int, int, torch.Tensor], None]


@dataclass
class KeptTally:
    """Rows seen by the hooks and the fewest / most neurons any of them kept."""

    rows: int = 0
    min_kept: int | None = None
    max_kept: int | None = None

    def add(self, rows: int, min_kept: int, max_kept: int) -> None:
        """Count ``rows`` more rows whose kept-neuron counts lie in [min_kept, max_kept]."""
        if rows == 0:
            return
        self.rows += rows
        self.min_kept = min_kept if self.min_kept is None else min(self.min_kept, min_kept)
        self.max_kept = max_kept if self.max_kept is None else max(self.max_kept, max_kept)


class NeuronControl:
    """Shared by all expert hooks of one model.

    ``keep_ratio``: None runs each expert as the model itself does (a MoNE checkpoint keeps its
    trained ratio, everything else all neurons); a number rho in (0, 1] keeps
    K = max(1, round(rho * F)) neurons per (token, expert) by |g|, ties to the lower index.
    ``recorder``: called with every expert's ``|g|`` rows before any pruning.
    """

    def __init__(self) -> None:
        self.keep_ratio: float | None = None
        self.recorder: Recorder | None = None
        self.tally = KeptTally()

    def num_kept(self, num_neurons: int) -> int | None:
        """K for an expert of ``num_neurons`` neurons under the current setting (None: own)."""
        if self.keep_ratio is None:
            return None
        return num_kept_neurons(self.keep_ratio, num_neurons)

    def reset_tally(self) -> KeptTally:
        """Return the tally so far and start a new one."""
        tally, self.tally = self.tally, KeptTally()
        return tally


def keep_top_neurons(g_TF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``g`` with all but the ``k`` largest ``|g|`` of every row set to zero, and the mask.

    At ``k == F`` the input is returned untouched (no mask), so that keeping every neuron is
    bit-for-bit the unpruned computation.
    """
    num_neurons = g_TF.shape[-1]
    if k >= num_neurons:
        return g_TF, None
    # The ranking is done in fp32 so that bf16 models do not gain extra ties from rounding.
    mask_TF = neuron_topk_mask(g_TF.reshape(-1, num_neurons).abs().float(), k)
    return g_TF * mask_TF.view(g_TF.shape).to(g_TF.dtype), mask_TF


def kept_counts(mask_TF: torch.Tensor | None, rows: int, num_neurons: int) -> tuple[int, int]:
    """(fewest, most) neurons kept by any row; all ``num_neurons`` when there is no mask."""
    if mask_TF is None or rows == 0:
        return num_neurons, num_neurons
    per_row_T = mask_TF.sum(dim=-1)
    return int(per_row_T.min()), int(per_row_T.max())
