"""MoNE experts with every local expert's fc1 and fc2 as one grouped GEMM each.

The same function as :class:`MoNEExperts` (and, at rho = 1, as megatron-core's SequentialMLP),
computed in three steps over all dispatched rows instead of a loop over experts:

    fc1 of all local experts (one torch._grouped_mm)  ->  the MoNE activation times the router
    probability (one dispatch call)  ->  fc2 of all local experts (one torch._grouped_mm)

Parameters stay SequentialMLP's (``local_experts.<i>.linear_fc1.weight`` [2F, D] and
``linear_fc2.weight`` [D, F] per expert); the grouped weights are stacked from them at every
forward, which autograd differentiates back onto each expert's parameter. State dict, sharded
state dict, initialisation by name and expert-parallel resharding are therefore those of the
sequential experts, and checkpoints interchange between the two in both directions.

Legend: N dispatched rows on this rank, T rows of one expert, E local experts, D hidden size,
F neurons per expert (``moe_ffn_hidden_size``).
"""

from __future__ import annotations

import itertools

import torch

from mone_kernels import MoNEActivation, neuron_topk_swiglu_grouped
from mone_train.model.mone_experts import MoNEExperts


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient.

    ``torch._grouped_mm``'s backward rejects stride-0 gradients, which autograd produces for
    e.g. ``out.sum()``, and which an empty tensor may carry while counting as contiguous. The
    usual dense gradient passes through untouched.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad.is_contiguous() and 0 not in grad.stride():
            return grad
        return grad.new_empty(grad.shape).copy_(grad)


def grouped_linear(x_NI: torch.Tensor, weight_EOI: torch.Tensor, ends_E: torch.Tensor):
    """Rows ``ends[e-1]:ends[e]`` of ``x`` [N, I] times ``weight[e]`` [O, I] transposed -> [N, O].

    ``ends`` holds the int32 cumulative row counts of the groups (torch._grouped_mm's ``offs``);
    empty groups are allowed.
    """
    return _DenseGrad.apply(torch._grouped_mm(x_NI, weight_EOI.transpose(1, 2), offs=ends_E))


class GroupedMoNEExperts(MoNEExperts):
    """:class:`MoNEExperts` computed with grouped GEMMs; same arguments, parameters, results.

    NG-LBL, its logging, and the health monitor's ``monitor`` callback behave exactly as in
    MoNEExperts. Forward hooks registered on a local expert's ``linear_fc1`` (the health
    monitor's |SiLU(gate)| histogram) are called with that expert's slice of the grouped fc1
    output, since the per-expert linear layers no longer run.
    """

    def routed_forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, probs_N: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`MoNEExperts.routed_forward` with one grouped GEMM per projection."""
        with_balance, with_mask = self.observed_outputs()
        if self.num_local_experts == 1:
            counts = [x_ND.shape[0]]
        else:
            counts = tokens_per_expert_E.tolist()
        ends_E = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32)
        ends_E = ends_E.to(x_ND.device, non_blocking=True)
        w1_E2FD = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])
        fc1_N2F = grouped_linear(x_ND, w1_E2FD, ends_E)
        self._call_fc1_hooks(x_ND, fc1_N2F, counts)
        h_NF, activations = self._activation(fc1_N2F, probs_N, counts, with_balance, with_mask)
        w2_EDF = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])
        out_ND = grouped_linear(h_NF, w2_EDF, ends_E)
        self.observe_masks(activations, with_mask)
        if with_balance:
            out_ND = self._attach_ng_lbl(out_ND, activations, counts)
        return out_ND

    def _activation(
        self,
        fc1_N2F: torch.Tensor,
        probs_N: torch.Tensor,
        counts: list[int],
        with_balance: bool,
        with_mask: bool,
    ) -> tuple[torch.Tensor, list[MoNEActivation]]:
        """([N, F] masked SwiGLU product of all rows times their router probability, the
        activation of each local expert).

        Rows are independent, so without the per-expert balance loss or selection weights one
        call covers all rows (its mask is split per expert afterwards); with them, one chunk
        per expert.
        """
        weights = self.selection_weights()
        per_expert = with_balance or weights is not None
        chunks = list(fc1_N2F.split(counts)) if per_expert else [fc1_N2F]
        scales = list(probs_N.split(counts)) if per_expert else [probs_N]
        activations = neuron_topk_swiglu_grouped(
            chunks,
            self.num_kept,
            impl=self.kernel_impl,
            with_balance=with_balance,
            with_mask=with_mask,
            row_scales=scales,
            selection_weights=weights,
        )
        if len(activations) == 1:
            h_NF = activations[0].h
        else:
            h_NF = torch.cat([act.h for act in activations], dim=0)
        if not per_expert:
            mask_NF = activations[0].mask
            masks = mask_NF.split(counts) if mask_NF is not None else [None] * len(counts)
            activations = [
                MoNEActivation(h_TF, mask_TF, None)
                for h_TF, mask_TF in zip(h_NF.split(counts), masks)
            ]
        return h_NF, activations

    def _call_fc1_hooks(self, x_ND: torch.Tensor, fc1_N2F: torch.Tensor, counts: list[int]):
        """Run forward hooks of each expert's ``linear_fc1`` on its rows (as if it had run)."""
        fc1_modules = [expert.linear_fc1 for expert in self.local_experts]
        if not any(module._forward_hooks for module in fc1_modules):
            return
        rows = zip(x_ND.detach().split(counts), fc1_N2F.detach().split(counts))
        for module, (x_TD, fc1_T2F) in zip(fc1_modules, rows):
            for hook_id, hook in list(module._forward_hooks.items()):
                if hook_id in module._forward_hooks_with_kwargs:
                    hook(module, (x_TD,), {}, (fc1_T2F, None))
                else:
                    hook(module, (x_TD,), (fc1_T2F, None))
