"""Shared experts with the neuron top-K (``moe.shared_expert_mone=true``).

megatron-core's ``SharedExpertMLP`` is the always-on SwiGLU MLP of DeepSeek- and Qwen2-MoE-style
layers (optionally behind Qwen2-MoE's sigmoid gate). This subclass keeps its parameters, gate,
sharded state dict and checkpoints, and replaces the activation by the MoNE one: every token
keeps the K = round(rho * F_shared) neurons with the largest |SiLU(gate)|. No balance loss and
no neuron bias: every token passes through the shared expert, so none of its neurons can starve
for want of tokens. Why shared experts stay dense by default: docs/method.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from mone_kernels import neuron_topk_swiglu, num_kept_neurons


class MoNESharedExperts(SharedExpertMLP):
    """SharedExpertMLP whose activation keeps the top-K neurons per token."""

    def __init__(
        self,
        config,
        submodules,
        gate: bool,
        pg_collection=None,
        *,
        neuron_keep_ratio: float = 1.0,
        kernel_impl: str = "auto",
    ) -> None:
        super().__init__(config, submodules, gate, pg_collection=pg_collection)
        if config.tensor_model_parallel_size != 1:
            raise ValueError(
                "moe.shared_expert_mone=true needs tensor parallel size 1: a tensor-split shared "
                "expert holds part of each token's neurons, and its top-K would cross ranks"
            )
        self.num_neurons = config.moe_shared_expert_intermediate_size
        self.num_kept = num_kept_neurons(neuron_keep_ratio, self.num_neurons)
        self.kernel_impl = kernel_impl

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, D] -> [s, b, D]: fc1, the MoNE activation, fc2, then the gate if any."""
        fc1, _ = self.linear_fc1(hidden_states)
        fc1_T2F = fc1.reshape(-1, fc1.shape[-1])
        act = neuron_topk_swiglu(fc1_T2F, self.num_kept, impl=self.kernel_impl, with_mask=False)
        output, _ = self.linear_fc2(act.h.view(*fc1.shape[:-1], self.num_neurons))
        if self.use_shared_expert_gate:
            output = output * torch.sigmoid(F.linear(hidden_states, self.gate_weight))
        return output
