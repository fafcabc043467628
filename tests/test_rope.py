"""Fused RoPE (megatron-core's fusion slot, our CPU kernel) against megatron's unfused RoPE."""

from __future__ import annotations

import pytest
import torch

from mone_kernels.cpu_kernel import cpu_kernel_error

pytestmark = pytest.mark.skipif(
    cpu_kernel_error() is not None, reason=f"CPU kernel not buildable: {cpu_kernel_error()}"
)
S, B, H, D = 24, 3, 4, 16


def _freqs(width: int = D, positions: int = S) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, width, 2).float() / width))
    angles = torch.outer(torch.arange(positions).float(), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def _both(x, freqs, interleaved=False):
    """(fused, megatron's unfused): output and gradient of x."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from mone_train.model.rope import fused_apply_rotary_pos_emb

    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    results = []
    for rope in (
        lambda t: fused_apply_rotary_pos_emb(t, freqs, interleaved=interleaved),
        lambda t: _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved),
    ):
        t = x.detach().clone().requires_grad_()
        y = rope(t)
        y.backward(dy)
        results.append((y, t.grad))
    return results


def test_fused_rope_is_megatrons_rope_bit_for_bit():
    qkv = torch.randn(S, B, H, 3 * D, generator=torch.Generator().manual_seed(0))
    for x in (qkv[..., :D], qkv[..., :D].contiguous()):  # megatron's query is a strided view
        (y, dx), (y_ref, dx_ref) = _both(x, _freqs())
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_bf16_and_the_cases_left_to_megatron():
    x = torch.randn(S, B, H, D, generator=torch.Generator().manual_seed(1))
    (y, dx), (y_ref, dx_ref) = _both(x.bfloat16(), _freqs())
    assert y.dtype == dx.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2e-2, atol=2e-2)
    per_sample = _freqs().expand(S, B, 1, D).contiguous()
    # partial rotation, interleaved halves, one frequency row per (position, sample)
    for freqs, interleaved in ((_freqs(D // 2), False), (_freqs(), True), (per_sample, False)):
        (y, dx), (y_ref, dx_ref) = _both(x, freqs, interleaved)
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_operators_pass_torch_library_checks():
    x = torch.randn(5, 2, 3, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    torch.library.opcheck(torch.ops.mone_cpu.rope_fwd.default, (x, cos, sin))
    torch.library.opcheck(torch.ops.mone_cpu.rope_bwd.default, (x, cos, sin))


def test_gpt_model_with_fused_rope_is_bit_identical(megatron_single):
    from megatron.core.models.common.embeddings import rope_utils

    from mone_train.model.rope import fused_apply_rotary_pos_emb
    from tests.helpers.gpt_parity import loss_and_grads, tiny_gpt

    model = tiny_gpt("moe=moe", "model.rope_fusion=true")
    reference = tiny_gpt("moe=moe", "model.rope_fusion=false")
    assert model.config.apply_rope_fusion and not reference.config.apply_rope_fusion
    assert rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb
    reference.load_state_dict(model.state_dict())
    assert "_RoPECPUBackward" in _graph_nodes(model) - _graph_nodes(reference)
    loss_ref, grads = loss_and_grads(reference)
    loss, got = loss_and_grads(model)
    assert torch.equal(loss, loss_ref)
    for name, grad in got.items():
        assert torch.equal(grad, grads[name]), name


def _graph_nodes(model) -> set[str]:
    """Names of the autograd nodes of one forward (which RoPE actually ran)."""
    from mone_train.model.lm import causal_mask

    tokens = torch.zeros(1, 8, dtype=torch.long)
    loss = model(tokens, torch.arange(8)[None], causal_mask(8, torch.device("cpu")), labels=tokens)
    names, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names
