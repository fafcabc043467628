"""Upcycling: a dense model's MLPs become the experts of a MoE model with the same output.

Each dense SwiGLU MLP of width I is cut into g parts of I/g neurons (``--granularity g``; the
down projection sums over neurons, so the parts add up to the MLP exactly: D(x) = sum_s D_s(x))
and E/g copies of each part make the E experts: expert e is part e mod g of copy e div g.
Every copy c gets one random router row w_c, shared by its g parts, so every token scores the
g parts of a copy alike and the top-k (k = g m) takes m whole copies. With softmax over the k
chosen logits each chosen part gets probability q_c / g, with sum_c q_c = 1 over the chosen
copies, so the MoE layer gives

    sum_c (q_c / g) sum_s E_cs(x)  =  D(x)   when  E_cs = g D_s,

i.e. each part's down projection is scaled by g. The exact condition, then: top-k a multiple
of g, softmax over the chosen logits (not pre-softmax), no group-limited routing, expert bias,
scaling or token dropping (the imported recipe has none of them), and distinct router rows
(random, so the top-k never splits a copy). megatron-core's ``upcycling_utils`` takes the same
route of repeated router rows; it spreads its scale over both projections, which is exact only
for linear activations: here all of it sits on the linear down projection. MoNE (rho < 1) then
keeps the top-K neurons of each part, which is not the dense output: it trains from there.
"""

from __future__ import annotations

import torch

from mone_train.importer.hf_source import HFSource
from mone_train.importer.mapping import attention_tensors, dense_mlp, outer_tensors


def upcycled_state(source: HFSource, settings: dict, granularity: int, seed: int = 0) -> dict:
    """The upcycled model's tensors under megatron's names."""
    num_experts, hidden = settings["num_experts"], settings["hidden_size"]
    width = settings["moe_ffn_hidden_size"]
    copies = num_experts // granularity
    generator = torch.Generator().manual_seed(seed)
    state = outer_tensors(source, settings)
    for i in range(settings["num_layers"]):
        state.update(
            attention_tensors(source, settings, f"model.layers.{i}.", f"decoder.layers.{i}.")
        )
        m = f"decoder.layers.{i}.mlp."
        gate, up, down = dense_mlp(source, i)
        rows = torch.randn(copies, hidden, generator=generator) * settings["init_method_std"]
        state[f"{m}router.weight"] = rows.to(gate.dtype).repeat_interleave(granularity, dim=0)
        for e in range(num_experts):
            part = slice((e % granularity) * width, (e % granularity + 1) * width)
            state[f"{m}experts.local_experts.{e}.linear_fc1.weight"] = torch.cat(
                [gate[part], up[part]]
            )
            state[f"{m}experts.local_experts.{e}.linear_fc2.weight"] = down[:, part] * granularity
    return state
