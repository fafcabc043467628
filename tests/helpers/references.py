"""Independent references the tests compare against: literal transcriptions of docs/method.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_mask_by_sort(score_TF: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k mask through a stable descending sort: equal scores keep index order."""
    order_TF = torch.sort(score_TF, dim=-1, descending=True, stable=True).indices
    mask_TF = torch.zeros_like(score_TF, dtype=torch.bool)
    mask_TF.scatter_(-1, order_TF[:, :k], True)
    return mask_TF


def mone_activation_explicit(fc1_T2F: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h = SiLU(gate) * m * up with m from a stable sort, differentiated by autograd."""
    gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
    g_TF = F.silu(gate_TF)
    mask_TF = topk_mask_by_sort(g_TF.detach().abs(), k)
    return g_TF * mask_TF.float() * up_TF, mask_TF


def ng_lbl_literal(g_abs_TF: torch.Tensor, mask_TF: torch.Tensor) -> torch.Tensor:
    """L_e = F * sum_j f_j p_j for one expert, with f and p exactly as docs/method.md writes them."""
    num_tokens, num_neurons = g_abs_TF.shape
    num_kept = int(mask_TF[0].sum())
    f_F = mask_TF.float().sum(dim=0).detach() / (num_tokens * num_kept)
    p_F = (g_abs_TF / g_abs_TF.sum(dim=-1, keepdim=True)).sum(dim=0) / num_tokens
    return num_neurons * (f_F * p_F).sum()
