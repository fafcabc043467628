"""The SDPA core attention against megatron-core's DotProductAttention, alone and in a model.

Legend: S sequence, B batch, H query heads, G key/value heads, Dh head width.
"""

from __future__ import annotations

import pytest
import torch

from mone_train.compose import compose_config

SEQ, BATCH, HEADS, HEAD_DIM = 12, 3, 4, 8


def _cores(num_query_groups: int, dropout: float = 0.0):
    """(megatron's DotProductAttention, SDPAttention) for the same config, causal type."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mone_train.model.attention import SDPAttention
    from mone_train.model.builder import transformer_config

    cfg = compose_config(
        [
            "model=tiny",
            f"model.hidden_size={HEADS * HEAD_DIM}",
            f"model.num_attention_heads={HEADS}",
            f"model.num_query_groups={num_query_groups}",
            f"model.dropout={dropout}",
        ]
    )
    config = transformer_config(cfg)
    model_parallel_cuda_manual_seed(0)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    args = dict(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        pg_collection=pg,
    )
    return DotProductAttention(**args), SDPAttention(**args, cp_comm_type=None, softmax_scale=None)


def _qkv(num_query_groups: int):
    torch.manual_seed(3)
    q_SBHD = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, requires_grad=True)
    k_SBGD = torch.randn(SEQ, BATCH, num_query_groups, HEAD_DIM, requires_grad=True)
    v_SBGD = torch.randn(SEQ, BATCH, num_query_groups, HEAD_DIM, requires_grad=True)
    return q_SBHD, k_SBGD, v_SBGD


def _masks():
    from mone_train.model.lm import causal_mask

    causal = causal_mask(SEQ, torch.device("cpu"))
    # Per-sequence padding at the end plus causality: no row is fully masked.
    padded = causal.expand(BATCH, 1, SEQ, SEQ).clone()
    padded[1, :, :, 9:] = True
    padded[2, :, :, 5:] = True
    padded[:, :, torch.arange(SEQ), torch.arange(SEQ)] = False
    return {"causal": causal, "none": None, "padded": padded}


def _run(core, qkv, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv)
    out = core(q, k, v, mask, attn_mask_type=core.attn_mask_type)
    (out * dout).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("num_query_groups", [HEADS, 2, 1])
@pytest.mark.parametrize("mask_kind", ["causal", "none", "padded"])
def test_sdpa_core_matches_megatron_dot_product_attention(
    megatron_single, num_query_groups, mask_kind
):
    megatron_core, sdpa_core = _cores(num_query_groups)
    qkv = _qkv(num_query_groups)
    mask = _masks()[mask_kind]
    if mask_kind == "none":
        # megatron builds its causal mask on "cuda" when given none; ours needs none built.
        mask_for_megatron = _masks()["causal"]
    else:
        mask_for_megatron = mask
    dout = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM)
    expected = _run(megatron_core, qkv, mask_for_megatron, dout)
    got = _run(sdpa_core, qkv, mask, dout)
    assert got[0].shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_plain_causal_mask_takes_the_is_causal_path(megatron_single, monkeypatch):
    import torch.nn.functional as F

    _, sdpa_core = _cores(HEADS)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["is_causal"], kwargs["attn_mask"] is None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    qkv = _qkv(HEADS)
    masks = _masks()
    for kind in ("causal", "causal", "none", "padded"):
        sdpa_core(*qkv, masks[kind])
    assert seen == [(True, True), (True, True), (True, True), (False, False)]


def test_dropout_uses_megatrons_rng_tracker_in_training_only(megatron_single):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    _, no_dropout = _cores(2)
    _, core = _cores(2, dropout=0.5)
    assert core.dropout_p == 0.5
    qkv = _qkv(2)
    mask = _masks()["causal"]
    with torch.no_grad():
        plain = no_dropout(*qkv, mask)
        core.eval()
        torch.testing.assert_close(core(*qkv, mask), plain, rtol=0, atol=0)
        core.train()
        default_state = torch.get_rng_state()
        model_parallel_cuda_manual_seed(7)
        first = core(*qkv, mask)
        model_parallel_cuda_manual_seed(7)
        second = core(*qkv, mask)
        third = core(*qkv, mask)
    # The draw comes from the tracker's stream: reseeding it repeats the mask, the default
    # generator is left where it was.
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, plain) and not torch.equal(second, third)
    assert torch.equal(torch.get_rng_state(), default_state)


@pytest.mark.parametrize("num_query_groups", [4, 2])
def test_gpt_model_with_sdpa_core_matches_megatron_core(megatron_single, num_query_groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from mone_train.model.attention import SDPAttention
    from tests.helpers.gpt_parity import loss_and_grads, tiny_gpt

    groups = f"model.num_query_groups={num_query_groups}"
    reference = tiny_gpt("moe=moe", "model.attention=megatron", groups)
    model = tiny_gpt("moe=moe", "model.attention=sdpa", groups)
    model.load_state_dict(reference.state_dict())
    assert sum(isinstance(m, DotProductAttention) for m in reference.modules()) == 2
    assert sum(isinstance(m, SDPAttention) for m in model.modules()) == 2
    assert not any(isinstance(m, DotProductAttention) for m in model.modules())
    loss_ref, grads = loss_and_grads(reference)
    loss, got = loss_and_grads(model)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, grads[name], rtol=0, atol=1e-5, msg=name)


def test_attention_choice_is_validated():
    from mone_train.config import validate
    from mone_train.errors import ConfigError

    with pytest.raises(ConfigError, match="model.attention='flash'"):
        validate(compose_config(["model.attention=flash"]))
