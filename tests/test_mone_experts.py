"""The MoNE experts module against megatron-core's own SequentialMLP and explicit formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.references import mone_activation_explicit, ng_lbl_literal

HIDDEN, NEURONS, EXPERTS = 32, 24, 4


def _experts(kind: str, **params):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from mone_train.config import Config
    from mone_train.model.builder import transformer_config
    from mone_train.model.mone_experts import MoNEExperts

    cfg = Config()
    cfg.model.hidden_size = HIDDEN
    cfg.model.num_experts = EXPERTS
    cfg.model.moe_ffn_hidden_size = NEURONS
    config = transformer_config(cfg)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    torch.manual_seed(0)
    if kind == "sequential":
        return SequentialMLP(EXPERTS, config, submodules, pg_collection=pg)
    module = MoNEExperts(EXPERTS, config, submodules, pg_collection=pg, **params)
    module.layer_number = 1
    return module


def _inputs(counts):
    torch.manual_seed(1)
    tokens = int(sum(counts))
    x = torch.randn(tokens, HIDDEN, dtype=torch.float64).float()
    probs = torch.rand(tokens)
    return x, torch.tensor(counts), probs


def _run(module, x, counts, probs, dout):
    x = x.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    out, bias = module(x, counts, probs)
    assert bias is None
    (out * dout).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.detach(), x.grad, probs.grad, grads


@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [15, 0, 0, 0]])
def test_keep_ratio_one_matches_megatron_sequential_mlp(megatron_single, counts):
    reference = _experts("sequential")
    mone = _experts("mone", neuron_keep_ratio=1.0, ng_lbl_coeff=0.1)
    mone.load_state_dict(reference.state_dict())
    x, counts_t, probs = _inputs(counts)
    dout = torch.randn(x.shape[0], HIDDEN)
    ref = _run(reference, x, counts_t, probs, dout)
    got = _run(mone, x, counts_t, probs, dout)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=1e-6)
    assert got[3].keys() == ref[3].keys()
    for name in ref[3]:
        torch.testing.assert_close(got[3][name], ref[3][name], rtol=0, atol=1e-6, msg=name)


def test_half_keep_ratio_matches_explicit_expert_formula(megatron_single):
    mone = _experts("mone", neuron_keep_ratio=0.5, ng_lbl_coeff=0.0)
    counts = [6, 2, 0, 9]
    x, counts_t, probs = _inputs(counts)
    out, _ = mone(x, counts_t, probs)
    expected = []
    for expert, x_e, p_e in zip(mone.local_experts, x.split(counts), probs.split(counts)):
        fc1 = x_e @ expert.linear_fc1.weight.t()
        h, mask = mone_activation_explicit(fc1, NEURONS // 2)
        assert (mask.sum(dim=-1) == NEURONS // 2).all()
        expected.append((h * p_e[:, None]) @ expert.linear_fc2.weight.t())
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_ng_lbl_adds_beta_times_mean_expert_loss_to_the_gradients(megatron_single):
    beta, num_moe_layers = 0.5, 2
    counts = [6, 0, 5, 9]
    x, counts_t, probs = _inputs(counts)
    dout = torch.randn(x.shape[0], HIDDEN)
    with_loss = _experts(
        "mone", neuron_keep_ratio=0.25, ng_lbl_coeff=beta, num_moe_layers=num_moe_layers
    )
    without = _experts("mone", neuron_keep_ratio=0.25, ng_lbl_coeff=0.0)
    without.load_state_dict(with_loss.state_dict())
    got = _run(with_loss, x, counts_t, probs, dout)

    # Reference: the plain MoNE output plus beta / layers * mean over non-empty experts of L_e.
    x_ref = x.clone().requires_grad_()
    out, _ = without(x_ref, counts_t, probs)
    losses = []
    k = round(0.25 * NEURONS)
    for expert, x_e in zip(without.local_experts, x_ref.split(counts)):
        if x_e.shape[0] == 0:
            continue
        fc1 = x_e @ expert.linear_fc1.weight.t()
        _, mask = mone_activation_explicit(fc1, k)
        losses.append(ng_lbl_literal(F.silu(fc1[:, :NEURONS]).abs(), mask))
    total = (out * dout).sum() + beta / num_moe_layers * torch.stack(losses).mean()
    total.backward()
    # Not bitwise: the module's backward forms d L_e / d|g_tj| as scale / s_t * (c_j - share_t),
    # autograd of the literal formula as separate terms that cancel, and both sum over tokens
    # in their own order. The error is a few ulps of the summands (all below 0.1 here, so
    # ulps <= 7.5e-9), not of the result, hence atol 1e-6 for entries near 0.
    for name, p in without.named_parameters():
        torch.testing.assert_close(got[3][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(
        got[3]["local_experts.0.linear_fc1.weight"],
        _run(without, x, counts_t, probs, dout)[3]["local_experts.0.linear_fc1.weight"],
    )


def test_ng_lbl_is_logged_per_layer(megatron_single):
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    clear_aux_losses_tracker()
    mone = _experts("mone", neuron_keep_ratio=0.5, ng_lbl_coeff=0.01)
    x, counts_t, probs = _inputs([4, 4, 4, 4])
    mone(x, counts_t, probs)
    values = get_moe_layer_wise_logging_tracker()["ng_lbl"]["values"]
    # L_e lies in (0, F/K]: F/K when every token picks the same neurons and they hold everything.
    assert 0.0 < values[0].item() <= NEURONS / (NEURONS // 2)
    assert (values[1:] == 0).all()
    clear_aux_losses_tracker()
