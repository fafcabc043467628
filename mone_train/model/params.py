"""Parameter counts: total, and activated per token under MoE routing and under MoNE.

Per token and routed expert (D hidden, F neurons, K kept), plain MoE touches 3*D*F weights;
MoNE touches all of W_gate (D*F) but only K rows of W_up and K columns of W_down (2*D*K). The
activated MoE-layer parameter ratio is therefore (D*F + 2*D*K) / (3*D*F) = (1 + 2*rho) / 3.
Shared experts and dense layers are activated for every token (a MoNE shared expert of width S
keeping K_s touches D*S + 2*D*K_s of its weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.experts import SequentialMLP

from mone_train.model.mone_experts import MoNEExperts
from mone_train.model.shared_experts import MoNESharedExperts


@dataclass(frozen=True)
class ParamCounts:
    """Model-wide counts (all experts of all expert-parallel ranks)."""

    total: int
    expert: int  # routed-expert weights, all experts
    activated_moe: int  # per token with top-k routing and whole experts
    activated: int  # per token with the neuron top-k (equals activated_moe for plain MoE)
    neuron_keep_ratio: float  # rho (K / F as used, after rounding)
    moe_layer_activated_ratio: float  # (1 + 2 rho) / 3 of an expert's weights per routed token

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the start-up banner."""
        return (
            f"parameters: total {self.total / 1e6:.2f}M | activated per token "
            f"{self.activated / 1e6:.2f}M (MoE routing alone {self.activated_moe / 1e6:.2f}M) | "
            f"neuron keep ratio rho={self.neuron_keep_ratio:.3f} | activated MoE-layer "
            f"parameter ratio (1+2rho)/3={self.moe_layer_activated_ratio:.3f}"
        )


def count_parameters(
    model: torch.nn.Module,
    router_topk: int,
    ep_size: int = 1,
    tp_size: int = 1,
    pp_group=None,
) -> ParamCounts:
    """Count from the built model (works on the meta device too); model-wide counts from one
    rank's part: tensor-parallel slices times ``tp_size``, local experts times ``ep_size``, and
    with pipeline stages summed over ``pp_group``."""
    from mone_train.model.init import is_tensor_split

    def whole(p: torch.nn.Parameter) -> int:
        return p.numel() * (tp_size if is_tensor_split(p, tp_size) else 1)

    # (not the last pipeline stage's copy of the word embedding: megatron marks it ``shared``)
    all_params = {id(p): p for p in model.parameters() if not getattr(p, "shared", False)}
    total_local = sum(whole(p) for p in all_params.values())
    expert_local = 0
    activated_experts_moe = 0
    activated_experts = 0
    kept_ratio = 1.0
    shared_skipped = 0  # weights a MoNE shared expert does not touch per token (2 D (S - K))
    for module in model.modules():
        if isinstance(module, MoNESharedExperts):
            hidden = module.linear_fc2.weight.shape[0]
            shared_skipped += 2 * hidden * (module.num_neurons - module.num_kept)
        if not isinstance(module, SequentialMLP):
            continue
        expert_local += sum(p.numel() for p in module.parameters())
        expert = module.local_experts[0]
        hidden = expert.linear_fc2.weight.shape[0]
        num_neurons = expert.linear_fc2.weight.shape[1]
        num_kept = module.num_kept if isinstance(module, MoNEExperts) else num_neurons
        kept_ratio = num_kept / num_neurons
        activated_experts_moe += router_topk * 3 * hidden * num_neurons
        activated_experts += router_topk * (hidden * num_neurons + 2 * hidden * num_kept)
    dense = total_local - expert_local
    sums = [dense, expert_local, activated_experts_moe, activated_experts - shared_skipped]
    if pp_group is not None and dist.get_world_size(pp_group) > 1:  # the other stages' layers
        device = next(model.parameters()).device  # (NCCL reduces device tensors only)
        stacked = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(stacked, group=pp_group)
        sums = [int(v) for v in stacked.tolist()]
        # (a stage without MoE layers says 1)
        ratio = torch.tensor([kept_ratio], dtype=torch.float64, device=device)
        dist.all_reduce(ratio, op=dist.ReduceOp.MIN, group=pp_group)
        kept_ratio = float(ratio)
    dense, expert_local, activated_experts_moe, activated_experts = sums
    return ParamCounts(
        total=dense + expert_local * ep_size,
        expert=expert_local * ep_size,
        activated_moe=dense + activated_experts_moe,
        activated=dense + activated_experts,
        neuron_keep_ratio=kept_ratio,
        moe_layer_activated_ratio=(1 + 2 * kept_ratio) / 3,
    )
