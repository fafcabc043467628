"""The Triton MoNE kernel and the fp32 PyTorch reference run side by side (CPU and GPU tiers)."""

from __future__ import annotations

import torch

from mone_kernels import neuron_topk_swiglu_reference
from mone_kernels.triton_topk_swiglu import neuron_topk_swiglu_triton


def kernel_and_reference(fc1: torch.Tensor, k: int):
    """Kernel and reference (fp32) on the same input with one random upstream gradient:
    ``(h, packed mask, d fc1)`` of each."""
    dh = torch.randn(fc1.shape[0], fc1.shape[1] // 2, device=fc1.device)
    x = fc1.clone().requires_grad_()
    h, packed, _ = neuron_topk_swiglu_triton(x, k)
    (h.float() * dh).sum().backward()
    x_ref = fc1.float().clone().requires_grad_()
    h_ref, mask_ref, _ = neuron_topk_swiglu_reference(x_ref, k)
    (h_ref * dh).sum().backward()
    return (h, packed, x.grad), (h_ref, mask_ref, x_ref.grad)
