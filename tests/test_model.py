"""The megatron-core GPT model with MoNE experts: structure, counts, causality, meta build."""

from __future__ import annotations

import pytest
import torch

from mone_train.compose import compose_config


def _build(overrides, vocab=258):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.model.builder import build_gpt_model

    cfg = compose_config(overrides)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return cfg, build_gpt_model(cfg, vocab)


@pytest.mark.parametrize("flavour,expected", [("mone", "MoNEExperts"), ("moe", "SequentialMLP")])
def test_moe_layers_use_the_configured_experts(megatron_single, flavour, expected):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cfg, model = _build(
        ["model=tiny", f"moe={flavour}", "model.num_layers=4", "model.moe_layer_freq=2",
         "moe.grouped_gemm=false"]  # the per-expert module (grouped ones: test_grouped_experts)
    )  # fmt: skip
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == 2  # layers 1 and 3 of 4
    assert {type(m.experts).__name__ for m in moe_layers} == {expected}
    assert [m.layer_number for m in moe_layers] == [1, 3]
    if flavour == "mone":
        assert [m.experts.layer_number for m in moe_layers] == [1, 3]
        assert moe_layers[0].experts.num_kept == 64  # rho 0.5 of F = 128


def test_parameter_counts_follow_the_design_formulas(megatron_single):
    from mone_train.model.params import count_parameters

    cfg, model = _build(["model=tiny", "moe.neuron_keep_ratio=0.25"])
    counts = count_parameters(model, cfg.model.router_topk)
    d, f, e, k = 64, 128, 4, 32
    layers, topk = cfg.model.num_layers, cfg.model.router_topk
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.expert == layers * e * 3 * d * f
    dense = counts.total - counts.expert
    assert counts.activated_moe == dense + layers * topk * 3 * d * f
    assert counts.activated == dense + layers * topk * (d * f + 2 * d * k)
    assert counts.neuron_keep_ratio == 0.25
    assert counts.moe_layer_activated_ratio == pytest.approx(0.5)


def test_future_tokens_do_not_change_earlier_losses(megatron_single):
    from mone_train.model.lm import causal_mask

    _, model = _build(["model=tiny"])
    model.eval()
    seq = 16
    tokens = torch.randint(0, 256, (1, seq))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    pos = torch.arange(seq)[None]
    mask = causal_mask(seq, torch.device("cpu"))
    with torch.no_grad():
        a = model(tokens, pos, mask, labels=tokens)
        b = model(changed, pos, mask, labels=tokens)
    torch.testing.assert_close(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_real_scale_config_builds_on_the_meta_device(megatron_single):
    from mone_train.model.params import count_parameters

    with torch.device("meta"):
        cfg, model = _build(["model=1b"], vocab=50304)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model, cfg.model.router_topk)
    assert 0.9e9 < counts.total < 1.1e9
    assert counts.activated < 0.3 * counts.total
