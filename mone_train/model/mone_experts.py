"""MoNE experts: megatron-core's SequentialMLP with neuron top-k inside every routed expert.

The module keeps SequentialMLP's parameters, layout and ``sharded_state_dict`` (so checkpoints
and expert-parallel resharding are megatron-core's own) and replaces only the forward:

    fc1 of every local expert  ->  the MoNE activation over all their rows  ->  fc2 per expert

The neuron selection runs after token dispatch, on the rank that holds the expert, so expert
parallelism moves exactly the bytes it moves for plain MoE. Legend: N dispatched rows on this
rank, T rows of one expert, E local experts, D hidden size, F neurons per expert
(``moe_ffn_hidden_size``), K kept neurons.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
)

from mone_kernels import MoNEActivation, neuron_topk_swiglu_grouped, num_kept_neurons
from mone_train.model.neuron_balance import selection_weights

NG_LBL_TRACKER_NAME = "ng_lbl"


class MoNEExperts(SequentialMLP):
    """Routed SwiGLU experts that keep the top-K neurons per token by |SiLU(gate)|.

    Args (beyond SequentialMLP's):
        neuron_keep_ratio: rho in (0, 1]; K = max(1, round(rho * F)). At 1 the computation is the
            plain SwiGLU expert.
        ng_lbl_coeff: beta of the neuron-granular load-balance loss (0 disables it).
        num_moe_layers: MoE layers in the model; NG-LBL is averaged over them.
        kernel_impl: implementation of the activation, see ``mone_kernels.IMPLS``.
        neuron_bias_update_rate: with a number, the experts keep a per-neuron selection bias
            (``neuron_bias`` [E_local, F], checkpointed along the expert axis) moved by this
            rate (:mod:`mone_train.model.neuron_balance`); None: no bias.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        pg_collection=None,
        *,
        neuron_keep_ratio: float = 1.0,
        ng_lbl_coeff: float = 0.0,
        num_moe_layers: int = 1,
        kernel_impl: str = "auto",
        neuron_bias_update_rate: float | None = None,
    ) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if not (config.gated_linear_unit and config.activation_func is F.silu):
            raise ValueError("MoNE experts need SwiGLU experts (gated_linear_unit with SiLU)")
        if config.add_bias_linear or config.moe_apply_probs_on_input:
            raise ValueError(
                "MoNE experts support add_bias_linear=False, moe_apply_probs_on_input=False"
            )
        self.num_neurons = config.moe_ffn_hidden_size
        self.neuron_keep_ratio = neuron_keep_ratio
        self.num_kept = num_kept_neurons(neuron_keep_ratio, self.num_neurons)
        self.ng_lbl_coeff = ng_lbl_coeff
        self.num_moe_layers = num_moe_layers
        self.kernel_impl = kernel_impl
        # Set by the model builder from the enclosing MoE layer; used for per-layer logging.
        self.layer_number: int | None = None
        # megatron's loss trackers hold the multi-token prediction layers after the decoder's
        self.num_layers = config.num_layers + (config.mtp_num_layers or 0)
        # Set by mone_train.components.health.HealthMonitor: called with the local experts' neuron masks.
        self.monitor = None
        self.neuron_bias_update_rate = neuron_bias_update_rate
        if neuron_bias_update_rate is not None and self.num_kept < self.num_neurons:
            shape = (num_local_experts, self.num_neurons)
            self.register_buffer("neuron_bias", torch.zeros(shape, dtype=torch.float32))
            # this step's selections per neuron, summed over the observed forwards
            counts = torch.zeros(shape, dtype=torch.float32)
            self.register_buffer("neuron_selections", counts, persistent=False)
        else:
            self.neuron_bias = self.neuron_selections = None

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, probs_N: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """[N, D] dispatched tokens, [E] tokens per local expert, [N] router probs
        -> ([N, D], None), as megatron's MoE layer calls its experts.

        With ``moe_pad_expert_input_to_capacity`` every expert receives exactly its capacity
        of rows, the missing ones filled with tokens it was not routed (router probability 0,
        so their output is multiplied away). They are left out here, so that the neuron
        statistics (NG-LBL, the neuron bias's counts, health) see routed tokens only; their
        output rows are the zeros megatron's experts would give them.
        """
        if not self.config.moe_pad_expert_input_to_capacity:
            return self.routed_forward(x_ND, tokens_per_expert_E, probs_N), None
        routed_N = probs_N != 0
        counts = [int(chunk.sum()) for chunk in routed_N.split(tokens_per_expert_E.tolist())]
        rows = routed_N.nonzero().squeeze(-1)
        out_RD = self.routed_forward(
            x_ND[rows], torch.tensor(counts, device=tokens_per_expert_E.device), probs_N[rows]
        )
        return x_ND.new_zeros(x_ND.shape).index_copy(0, rows, out_RD.to(x_ND.dtype)), None

    def routed_forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, probs_N: torch.Tensor
    ) -> torch.Tensor:
        """The experts on rows of routed tokens: [N, D], [E] rows per local expert, [N] -> [N, D]."""
        with_balance, with_mask = self.observed_outputs()
        out_ND, activations, counts = experts_forward(
            self,
            x_ND,
            tokens_per_expert_E,
            probs_N,
            self.num_kept,
            impl=self.kernel_impl,
            with_balance=with_balance,
            with_mask=with_mask,
            selection_weights=self.selection_weights(),
        )
        self.observe_masks(activations, with_mask)
        if with_balance:
            out_ND = self._attach_ng_lbl(out_ND, activations, counts)
        return out_ND

    def observed_outputs(self) -> tuple[bool, bool]:
        """(compute NG-LBL, build the neuron mask for the health monitor) for this forward.

        Only a training forward that records the autograd graph computes and logs them. Under
        activation recompute megatron's checkpoint runs the forward twice: first without grad
        (outputs kept, graph discarded), then again with grad inside backward. Counting only
        the graph-building pass (megatron's router does the same for its aux loss) logs and
        observes each training forward once and gives the NG-LBL loss one backward.
        """
        observed = self.training and torch.is_grad_enabled()
        with_balance = observed and self.ng_lbl_coeff > 0 and self.num_kept < self.num_neurons
        # The [N, F] bool mask is built only for the health monitor and the neuron bias's
        # counts (the kernel packs its own).
        with_mask = observed and (self.monitor is not None or self.neuron_bias is not None)
        return with_balance, with_mask

    def selection_weights(self) -> list[torch.Tensor] | None:
        """Per local expert, the neuron bias's selection weights; None without a bias."""
        if self.neuron_bias is None:
            return None
        if self.neuron_bias.dtype != torch.float32:  # a bf16 cast of the model: keep fp32
            self.neuron_bias.data = self.neuron_bias.data.float()
        return selection_weights(self.neuron_bias)

    def observe_masks(self, activations: list[MoNEActivation], with_mask: bool) -> None:
        """Hand an observed forward's masks to the health monitor and count them for the bias."""
        if not with_mask:
            return
        if self.monitor is not None:
            self.monitor([act.mask for act in activations])
        if self.neuron_bias is not None:
            for e, act in enumerate(activations):
                if act.mask is not None and act.mask.shape[0]:
                    self.neuron_selections[e] += act.mask.sum(dim=0, dtype=torch.float32)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """SequentialMLP's, plus the neuron bias stacked along the global expert axis."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.neuron_bias is not None:
            key = f"{prefix}neuron_bias"
            sharded[key] = ShardedTensor.from_rank_offsets(
                key,
                self.neuron_bias,
                *sharded_offsets,
                (len(sharded_offsets), self.ep_group.rank(), self.ep_group.size()),
                replica_id=(0, 0, self.dp_group.rank()),
                prepend_axis_num=len(sharded_offsets),
            )
        return sharded

    def _attach_ng_lbl(
        self, out_ND: torch.Tensor, activations: list[MoNEActivation], counts: list[int]
    ) -> torch.Tensor:
        """Add beta * L_layer / num_moe_layers to the backward pass and log L_layer.

        L_layer is the mean of the per-expert losses over local experts that received tokens.
        """
        losses = [act.balance for act, count in zip(activations, counts) if count > 0]
        if not losses:
            return out_ND
        loss = torch.stack(losses).mean()
        # Logged raw per layer, as megatron logs its own aux loss; readers average over layers.
        save_to_aux_losses_tracker(
            NG_LBL_TRACKER_NAME, loss.detach(), self.layer_number, self.num_layers
        )
        return MoEAuxLossAutoScaler.apply(out_ND, loss * (self.ng_lbl_coeff / self.num_moe_layers))


def experts_forward(
    experts: SequentialMLP,
    x_ND: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    probs_N: torch.Tensor,
    num_kept: int,
    *,
    impl: str = "auto",
    with_balance: bool = False,
    with_mask: bool = True,
    fc1_observer: Callable[[int, torch.Tensor], None] | None = None,
    selection_weights: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[MoNEActivation], list[int]]:
    """The MoNE computation of any SwiGLU ``SequentialMLP`` (its own weights) with K = ``num_kept``.

    fc1 of every local expert -> the MoNE activation over all their rows, times the router
    probability (inside the activation's pass where the implementation fuses it) -> fc2 per
    expert. ``fc1_observer(local_expert, fc1_T2F)`` sees each expert's fc1 output before any
    selection (the analysis tools histogram |SiLU(gate)| from it). Returns the [N, D] output,
    the activation of each local expert and the rows each received.
    """
    if experts.num_local_experts == 1:
        counts = [x_ND.shape[0]]
    else:
        counts = tokens_per_expert_E.tolist()
    x_chunks = torch.split(x_ND, counts)
    probs_chunks = torch.split(probs_N, counts)
    fc1_chunks = [
        expert.linear_fc1(x_TD)[0] for expert, x_TD in zip(experts.local_experts, x_chunks)
    ]
    if fc1_observer is not None:
        for i, fc1_T2F in enumerate(fc1_chunks):
            fc1_observer(i, fc1_T2F)
    activations = neuron_topk_swiglu_grouped(
        fc1_chunks,
        num_kept,
        impl=impl,
        with_balance=with_balance,
        with_mask=with_mask,
        row_scales=list(probs_chunks),  # h times the router probability, as megatron's experts
        selection_weights=selection_weights,
    )
    out_chunks = [
        expert.linear_fc2(act.h)[0] for expert, act in zip(experts.local_experts, activations)
    ]
    out_ND = out_chunks[0] if len(out_chunks) == 1 else torch.cat(out_chunks, dim=0)
    return out_ND, activations, counts
