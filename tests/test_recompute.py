"""Activation recompute (``trainer.recompute``): same numbers, statistics counted once, less memory.

Under recompute megatron-core runs the recomputed part's forward twice (without grad, then with
grad inside backward). Losses, every gradient, the NG-LBL and aux-loss logs and the health
counters must equal the run without recompute; the peak of the CPU allocator must drop.
"""

from __future__ import annotations

import pytest
import torch

from mone_train.compose import compose_config
from mone_train.errors import ConfigError

SEQ, BATCH, VOCAB = 64, 4, 258
RECOMPUTE = ("none", "moe", "full")
# (name, overrides): grouped MoNE (the GPU default), per-expert MoNE, megatron's SequentialMLP.
VARIANTS = {
    "mone": ["moe=mone", "moe.grouped_gemm=true", "moe.ng_lbl_coeff=1.0"],
    "mone-sequential": ["moe=mone", "moe.grouped_gemm=false", "moe.ng_lbl_coeff=1.0"],
    "moe": ["moe=moe", "moe.grouped_gemm=false"],
}


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ)


def peak_allocated_bytes(events) -> int:
    """Peak of the CPU allocator's live bytes over profiler memory events (relative to start)."""
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _train_forward_backward(overrides: list[str], recompute: str) -> dict:
    """One training forward + backward of the tiny model; everything the tests compare."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )
    from torch.profiler import ProfilerActivity, profile

    from mone_train.components.health import HealthMonitor
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    # Dropout on: the recomputed forward must replay the same random masks.
    base = ["model=tiny", "model.dropout=0.1", f"trainer.recompute={recompute}"]
    cfg = compose_config(base + overrides)
    model, params = build_model(cfg, VOCAB)
    monitor = HealthMonitor(model)
    tokens, labels, positions = _batch()
    mask = causal_mask(SEQ, torch.device("cpu"))
    # A global: entries left by earlier tests are sized by their layer count, so start empty.
    get_moe_layer_wise_logging_tracker().clear()
    model.train()
    model.zero_grad_buffer()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(tokens, positions, mask, labels=labels).float().mean()
        loss.backward()
    model.finish_grad_sync()
    tracker = get_moe_layer_wise_logging_tracker()
    aux = {name: entry["values"].clone() for name, entry in tracker.items()}
    clear_aux_losses_tracker()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    names = [name for name, _ in model.named_parameters()]
    result = {
        "loss": loss.detach(),
        "grads": {n: p.main_grad.clone() for n, p in zip(names, params)},
        "health": monitor.collect(),
        "aux": aux,
        "peak_bytes": peak_allocated_bytes(events),
    }
    monitor.remove()
    return result


@pytest.fixture(scope="module", params=list(VARIANTS))
def runs(request):
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed

    init_distributed(1)
    try:
        yield {rc: _train_forward_backward(VARIANTS[request.param], rc) for rc in RECOMPUTE}
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("recompute", ["moe", "full"])
def test_losses_and_gradients_equal_without_recompute(runs, recompute):
    base, other = runs["none"], runs[recompute]
    torch.testing.assert_close(other["loss"], base["loss"], rtol=0, atol=1e-6)
    assert other["grads"].keys() == base["grads"].keys()
    for name, grad in base["grads"].items():
        assert grad.abs().sum() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(other["grads"][name], grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("recompute", ["moe", "full"])
def test_health_counters_and_aux_logs_count_each_forward_once(runs, recompute):
    base, other = runs["none"], runs[recompute]
    tokens = [base["health"][f"load/{layer}/tokens"] for layer in (0, 1)]
    # Top-2 routing of every token of the micro batch, once: 2 x B x S (token, expert) pairs.
    assert [sum(t) for t in tokens] == [2 * BATCH * SEQ] * 2
    assert other["health"] == base["health"]
    assert other["aux"].keys() == base["aux"].keys()
    assert (base["aux"]["load_balancing_loss"] > 0).all()  # logged for both MoE layers
    for name, values in base["aux"].items():
        torch.testing.assert_close(other["aux"][name], values, rtol=0, atol=1e-6, msg=name)


def test_mone_logs_ng_lbl_and_neuron_utilisation(runs, request):
    base = runs["none"]
    if request.node.callspec.params["runs"] == "moe":  # plain MoE experts: neither is logged
        assert "neurons/0/utilisation" not in base["health"] and "ng_lbl" not in base["aux"]
        return
    assert (base["aux"]["ng_lbl"] > 0).all()  # logged for both MoE layers
    assert 0 < base["health"]["neurons/0/utilisation"] <= 1


def test_recompute_lowers_the_peak_of_the_cpu_allocator(runs):
    """The peaks follow from tensor shapes, not the CPU (thread scratch moves them by kilobytes).
    Without recompute both layers' activations A are live when backward starts: L + 2A, L being
    the logits, log-softmax and their gradient ([4, 64, 258] fp32 each, about 1 MB). Each A holds
    attention scores, softmax and dropout ([4, 4, 64, 64] fp32 each) and the MoE rows ([512, 256]
    fp32 fc1 outputs and more), about 3 MB. moe recomputes the MoE rows; full (one layer per
    checkpoint) keeps one layer's A at a time: about (L + A) / (L + 2A), under 0.8 while L < 3A."""
    peaks = {rc: runs[rc]["peak_bytes"] for rc in RECOMPUTE}
    assert peaks["none"] > peaks["moe"] > peaks["full"] > 0, peaks
    assert peaks["full"] < 0.8 * peaks["none"], peaks


def test_ng_lbl_gradient_is_large_enough_for_the_comparison_to_matter(megatron_single):
    """The NG-LBL term moves the gradients by far more than the tolerance above, so equal
    gradients under recompute mean its loss entered backward exactly once."""
    with_loss = _train_forward_backward(VARIANTS["mone"], "full")
    no_ng_lbl = [o for o in VARIANTS["mone"] if not o.startswith("moe.ng_lbl_coeff=")]
    without = _train_forward_backward([*no_ng_lbl, "moe.ng_lbl_coeff=0"], "full")
    gaps = [(with_loss["grads"][n] - g).abs().max() for n, g in without["grads"].items()]
    assert max(gaps) > 1e-4


def test_recompute_maps_onto_megatron_switches():
    from mone_train.model.builder import transformer_config

    def config(recompute):
        return transformer_config(compose_config(["model=tiny", f"trainer.recompute={recompute}"]))

    assert config("none").recompute_granularity is None
    moe = config("moe")
    assert (moe.recompute_granularity, moe.recompute_modules) == ("selective", ["moe"])
    full = config("full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )


def test_unknown_recompute_value_names_the_key():
    cfg = compose_config(["trainer.recompute=attention"])
    with pytest.raises(ConfigError, match=r"trainer.recompute='attention'.*'none', 'moe', 'full'"):
        cfg.validate()
