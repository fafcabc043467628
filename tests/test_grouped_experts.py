"""Grouped-GEMM MoNE experts against the expert-by-expert MoNEExperts and megatron's own.

Legend: N dispatched rows, E local experts, D hidden size, F neurons per expert.
"""

from __future__ import annotations

import pytest
import torch

from mone_train.compose import compose_config
from tests.helpers.distributed import TINY_RUN, metrics, run_processes

HIDDEN, NEURONS, EXPERTS = 32, 24, 4


def _experts(kind: str, **params):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from mone_train.model.builder import transformer_config
    from mone_train.model.grouped_experts import GroupedMoNEExperts
    from mone_train.model.mone_experts import MoNEExperts

    cfg = compose_config(
        [
            f"model.hidden_size={HIDDEN}",
            f"model.num_experts={EXPERTS}",
            f"model.moe_ffn_hidden_size={NEURONS}",
        ]
    )
    config = transformer_config(cfg)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    torch.manual_seed(0)
    if kind == "sequential":
        return SequentialMLP(EXPERTS, config, submodules, pg_collection=pg)
    cls = {"mone": MoNEExperts, "grouped": GroupedMoNEExperts}[kind]
    module = cls(EXPERTS, config, submodules, pg_collection=pg, **params)
    module.layer_number = 1
    return module


def _pair(reference_kind: str, **params):
    reference = _experts(reference_kind, **params)
    grouped = _experts("grouped", **params)
    grouped.load_state_dict(reference.state_dict())
    return reference, grouped


def _inputs(counts):
    torch.manual_seed(1)
    tokens = int(sum(counts))
    return torch.randn(tokens, HIDDEN), torch.tensor(counts), torch.rand(tokens)


def _run(module, x, counts, probs, dout=None):
    """(output, dx, dprobs, {parameter: grad}) of one forward/backward."""
    x = x.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, bias = module(x, counts, probs)
    assert bias is None
    (out.sum() if dout is None else (out * dout).sum()).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.detach(), x.grad, probs.grad, grads


def _assert_same(got, expected, atol=1e-5):
    for name, a, b in zip(["out", "dx", "dprobs"], got[:3], expected[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)
    assert got[3].keys() == expected[3].keys()
    for name in expected[3]:
        torch.testing.assert_close(got[3][name], expected[3][name], rtol=0, atol=atol, msg=name)


COUNTS = [[5, 0, 7, 3], [15, 0, 0, 0], [0, 0, 0, 0], [1, 2, 1, 9]]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25, 1.0])
@pytest.mark.parametrize("training", [True, False])
def test_grouped_matches_expert_by_expert_mone(megatron_single, counts, keep_ratio, training):
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    reference, grouped = _pair("mone", neuron_keep_ratio=keep_ratio, ng_lbl_coeff=0.3)
    reference.train(training)
    grouped.train(training)
    x, counts_t, probs = _inputs(counts)
    dout = torch.randn(x.shape[0], HIDDEN)
    logged = []
    for module in (reference, grouped):
        clear_aux_losses_tracker()
        masks = []
        module.monitor = masks.append
        result = _run(module, x, counts_t, probs, dout)
        tracker = get_moe_layer_wise_logging_tracker()
        logged.append((result, masks, tracker["ng_lbl"]["values"].clone() if tracker else None))
    clear_aux_losses_tracker()
    (expected, expected_masks, expected_ng), (got, got_masks, got_ng) = logged
    _assert_same(got, expected)
    # The health monitor sees the same per-expert masks (None at rho = 1), in training only.
    assert len(got_masks) == len(expected_masks) == (1 if training else 0)
    for a, b in zip(got_masks, expected_masks):
        assert len(a) == len(b) == EXPERTS
        for mask_a, mask_b in zip(a, b):
            assert (mask_a is None) == (mask_b is None)
            if mask_a is not None:
                assert torch.equal(mask_a, mask_b)
    # NG-LBL logged (and in the gradients above) exactly when and as MoNEExperts does.
    assert (got_ng is None) == (expected_ng is None)
    if expected_ng is not None:
        torch.testing.assert_close(got_ng, expected_ng, rtol=0, atol=1e-6)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter is off where CUDA is present: tests/test_gpu.py runs this on the GPU",
)
@pytest.mark.parametrize("training", [True, False])
def test_grouped_matches_mone_on_the_triton_path(megatron_single, training):
    # The kernel (interpreted on CPU) takes all rows at once: per-expert chunks joined for the
    # balance loss in training, the grouped fc1 output as it is in evaluation.
    reference, grouped = _pair(
        "mone", neuron_keep_ratio=0.5, ng_lbl_coeff=0.3, kernel_impl="triton"
    )
    reference.train(training)
    grouped.train(training)
    x, counts_t, probs = _inputs([5, 0, 7, 3])
    dout = torch.randn(x.shape[0], HIDDEN)
    _assert_same(_run(grouped, x, counts_t, probs, dout), _run(reference, x, counts_t, probs, dout))


@pytest.mark.parametrize("counts", COUNTS[:2])
def test_keep_ratio_one_matches_megatron_sequential_mlp(megatron_single, counts):
    reference, grouped = _pair("sequential")
    x, counts_t, probs = _inputs(counts)
    # out.sum(): its gradient is an expanded (stride-0) tensor, which grouped GEMMs must take.
    _assert_same(_run(grouped, x, counts_t, probs), _run(reference, x, counts_t, probs))


def test_fc1_hooks_see_each_experts_rows(megatron_single):
    reference, grouped = _pair("mone", neuron_keep_ratio=0.5)
    x, counts_t, probs = _inputs([5, 0, 7, 3])
    seen = {}
    for name, module in (("reference", reference), ("grouped", grouped)):
        seen[name] = []
        for expert in module.local_experts:
            expert.linear_fc1.register_forward_hook(
                lambda mod, args, out, log=seen[name]: log.append((args[0].shape[0], out[0]))
            )
        module(x, counts_t, probs)
    assert [rows for rows, _ in seen["grouped"]] == [5, 0, 7, 3]
    for (_, a), (_, b) in zip(seen["grouped"], seen["reference"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _model(overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.model.builder import build_gpt_model

    cfg = compose_config(["model=tiny", *overrides])
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_gpt_model(cfg, 258)


@pytest.mark.parametrize(
    "overrides,expected,num_kept",
    [
        (["moe=mone", "moe.grouped_gemm=true"], "GroupedMoNEExperts", 64),
        (["moe=mone", "moe.grouped_gemm=false"], "MoNEExperts", 64),
        (["moe=moe", "moe.grouped_gemm=false"], "SequentialMLP", None),
        (["moe=moe", "moe.grouped_gemm=true", "moe.neuron_keep_ratio=0.5"], "GroupedMoNEExperts", 128),
    ],
)  # fmt: skip
def test_builder_picks_the_experts_module(megatron_single, overrides, expected, num_kept):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    experts = [m.experts for m in _model(overrides).modules() if isinstance(m, MoELayer)]
    assert {type(e).__name__ for e in experts} == {expected}
    if num_kept is not None:  # plain MoE through grouped GEMMs: every neuron, no NG-LBL
        assert {e.num_kept for e in experts} == {num_kept}
    if overrides[0] == "moe=moe" and num_kept is not None:
        assert {e.ng_lbl_coeff for e in experts} == {0.0}


@pytest.mark.parametrize("flavour", ["mone", "moe"])
def test_grouped_experts_by_default_with_cuda_only(megatron_single, flavour):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mone_train.model.grouped_experts import GroupedMoNEExperts
    from mone_train.parallel.process_groups import on_cuda

    moe = compose_config([f"moe={flavour}"]).moe
    assert moe.grouped_gemm is None and moe.grouped_on("cuda") and not moe.grouped_on("cpu")
    experts = [m.experts for m in _model([f"moe={flavour}"]).modules() if isinstance(m, MoELayer)]
    assert all(isinstance(e, GroupedMoNEExperts) == on_cuda() for e in experts)


def test_sharded_state_dict_is_the_sequential_experts_one(megatron_single):
    sequential = _model(["moe=mone", "moe.grouped_gemm=false"])
    grouped = _model(["moe=mone", "moe.grouped_gemm=true"])
    assert sequential.state_dict().keys() == grouped.state_dict().keys()
    a, b = sequential.sharded_state_dict(), grouped.sharded_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if hasattr(a[key], "global_shape"):
            assert (a[key].key, a[key].global_shape, a[key].global_offset) == (
                b[key].key,
                b[key].global_shape,
                b[key].global_offset,
            ), key


TINY = [
    *TINY_RUN,
    "trainer.steps=4",
    "trainer.eval_interval=4",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.expert_parallel_size=2",
    "logging.wandb_mode=disabled",
    "moe=mone",
]


def _losses(run_dir):
    return [r.get("loss", r.get("val_loss")) for r in metrics(run_dir)]


@pytest.mark.slow
def test_expert_parallel_grouped_matches_sequential_and_loads_its_checkpoint(tmp_path):
    from mone_train.components.checkpoint import CHECKPOINTS

    sequential, grouped, resumed = (tmp_path / n for n in ("sequential", "grouped", "resumed"))
    run_processes(
        2,
        [
            *TINY,
            f"trainer.run_dir={sequential}",
            "moe.grouped_gemm=false",
            "trainer.save_interval=4",
        ],
    )
    run_processes(2, [*TINY, f"trainer.run_dir={grouped}", "moe.grouped_gemm=true"])
    # Same GEMMs per expert on CPU, so the neuron selections agree and the runs match closely;
    # a last-bit difference that flipped a top-K choice would show as a jump, not a drift.
    expected, got = _losses(sequential), _losses(grouped)
    assert len(expected) == len(got) == 5
    for a, b in zip(expected, got):
        assert abs(a - b) <= 1e-5, (expected, got)
    # The sequential experts' checkpoint, loaded into grouped experts (no further steps): the
    # evaluation loss is the one the sequential run logged when it saved.
    checkpoint = sequential / CHECKPOINTS / "step_00000004"
    run_processes(
        2,
        [*TINY, f"trainer.run_dir={resumed}", "moe.grouped_gemm=true",
         f"trainer.resume={checkpoint}", "trainer.eval_interval=1"],
    )  # fmt: skip
    loaded = [r["val_loss"] for r in metrics(resumed) if "val_loss" in r]
    assert loaded and abs(loaded[-1] - expected[-1]) <= 1e-6, (loaded, expected)
