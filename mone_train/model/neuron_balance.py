"""The neuron-level loss-free balance: a per-neuron selection bias inside every MoNE expert.

The analogue of DeepSeek-V3's auxiliary-loss-free expert balancing, one level down. Each
routed expert e keeps a bias b_ej per neuron. The top-K neurons of a token are chosen by

    log|g_j| + b_ej,   i.e. by  |g_j| * w_ej  with  w_ej = exp(b_ej)

and only the choice sees it: h = SiLU(gate) * mask * up is the plain product on the chosen
neurons, and no gradient reaches b. After every optimizer step each expert's bias moves by the
sign of its neurons' use error over that step's tokens,

    b_ej += rate * sign(mean_i c_ei - c_ej),     c_ej = tokens for which neuron j was kept,

counted over the whole job (all-reduced over the ranks that hold the same experts, so the
replicas of an expert stay identical). Adding the bias to log|g| rather than to |g| makes it
independent of a token's overall activation scale: a token whose gates are all small is
steered as much as one whose gates are large. ``moe.neuron_balance=bias`` turns it on
(docs/method.md); the NG-LBL loss is then off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# exp(+-30) keeps the weights finite and positive in fp32 (|g| * e^30 is finite for any |g|
# below 1e25); a bias that far out has long decided the selection anyway.
MAX_ABS_BIAS = 30.0


def selection_weights(bias_EF: torch.Tensor) -> list[torch.Tensor]:
    """The fp32 selection weights exp(b) of each local expert, [F] each."""
    return list(torch.exp(bias_EF.float().clamp(-MAX_ABS_BIAS, MAX_ABS_BIAS)).unbind(0))


def biased_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoNE expert modules of ``model`` that keep a neuron bias."""
    return [m for m in model.modules() if getattr(m, "neuron_bias", None) is not None]


@torch.no_grad()
def update_neuron_biases(model: torch.nn.Module, group=None) -> None:
    """Move every expert's neuron bias by the sign of its use error; clear the counts.

    ``group``: the ranks that hold the same experts (megatron's expert-data-parallel group),
    over which the counts are summed first; None on one process.
    """
    experts = biased_experts(model)
    if not experts:
        return
    counts_LEF = torch.stack([m.neuron_selections for m in experts])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_LEF, group=group)
    for module, counts_EF in zip(experts, counts_LEF):
        error_EF = counts_EF.mean(dim=-1, keepdim=True) - counts_EF
        module.neuron_bias.add_(torch.sign(error_EF), alpha=module.neuron_bias_update_rate)
        module.neuron_selections.zero_()
