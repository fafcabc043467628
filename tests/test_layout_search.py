"""``mone-plan --search``: enumeration, memory filter, cost model terms, output, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mone_train.compose import compose_config
from mone_train.errors import EXIT_CONFIG_ERROR
from mone_train.hardware import GIB
from mone_train.planning.layout_search import (
    HARDWARE,
    Layout,
    Overlap,
    layouts,
    search,
    step_time,
)
from mone_train.planning.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50304
ONE_B = ["model=1b", "trainer=gpu"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mone_train.planning.cli", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_every_kept_layout_fits_and_matches_the_planner():
    cfg = compose_config([*ONE_B, "model.vocab_size=50304"])
    hw = HARDWARE["H100"]
    result = search(cfg, VOCAB, 1, 8, hw)
    assert result.candidates and result.considered >= len(result.candidates)
    times = [c.time.total for c in result.candidates]
    assert times == sorted(times)
    for c in result.candidates[:20]:
        plan = make_plan(c.layout.applied_to(cfg), VOCAB, 8)
        assert c.memory_gib == pytest.approx(plan.total_bytes() / GIB)
        assert c.memory_gib <= result.usable_gib
        assert c.layout.tp * c.layout.pp * c.data_parallel == 8
        assert c.layout.ep * c.layout.pp * c.expert_data_parallel == 8


def test_enumeration_respects_the_models_divisibility():
    cfg = compose_config(["model=tiny", "trainer.global_batch_size=16"])
    found = layouts(cfg, 8, 8)
    assert found
    for lay in found:
        assert cfg.model.num_attention_heads % lay.tp == 0
        assert cfg.model.num_layers % lay.pp == 0
        assert cfg.model.num_experts % lay.ep == 0
        assert 8 % (lay.tp * lay.pp) == 0 and 8 % (lay.ep * lay.pp) == 0
        assert (16 // (8 // (lay.tp * lay.pp))) % lay.micro_batch == 0
    assert {lay.tp for lay in found} == {1, 2, 4}  # 4 heads: TP 8 is out
    assert {lay.recompute for lay in found} == {"none", "moe", "full"}


def test_cost_model_terms_follow_their_formulas():
    """The bubble is (P - 1) micro-batch times; all-to-all that leaves the node is slower
    than inside it; recompute adds a forward; overlap hides its share."""
    cfg = compose_config([*ONE_B, "model.vocab_size=50304", "trainer.global_batch_size=64"])
    hw = HARDWARE["H100"]
    pp4 = make_plan(Layout(1, 4, 8, 1, "none", True).applied_to(cfg), VOCAB, 32)
    time = step_time(pp4, hw, 8, Overlap())
    per_micro = (time.compute + time.memory_bound) / pp4.micro_batches
    assert time.bubble == pytest.approx(3 * (per_micro + (time.all_to_all + time.p2p)
                                             / pp4.micro_batches))  # fmt: skip
    inside = step_time(make_plan(Layout(1, 1, 8, 1, "none", True).applied_to(cfg), VOCAB, 32),
                       hw, 8, Overlap())  # fmt: skip
    across = step_time(make_plan(Layout(1, 1, 16, 1, "none", True).applied_to(cfg), VOCAB, 32),
                       hw, 8, Overlap())  # fmt: skip
    assert across.all_to_all > 2 * inside.all_to_all
    full = step_time(make_plan(Layout(1, 1, 8, 1, "full", True).applied_to(cfg), VOCAB, 32),
                     hw, 8, Overlap())  # fmt: skip
    assert full.compute == pytest.approx(inside.compute * 4 / 3)
    hidden = step_time(make_plan(Layout(1, 1, 8, 1, "none", True).applied_to(cfg), VOCAB, 32),
                       hw, 8, Overlap(all_to_all=0.5, grad_sync=1.0))  # fmt: skip
    assert hidden.all_to_all == pytest.approx(inside.all_to_all / 2)
    assert hidden.grad_sync == 0 < inside.grad_sync


@pytest.mark.slow  # a subprocess (imports megatron-core's config only: seconds)
def test_cli_prints_the_best_layouts_and_a_launch_line():
    out = _cli(*ONE_B, "model.vocab_size=50304", "--search", "--nodes", "4", "--gpus-per-node",
               "8", "--gpu", "H100")  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "valid layouts" in text and "why slower than #1" in text
    assert "launch: NNODES=4 MASTER_ADDR=<first node> launch/torchrun.sh 8 model=1b" in text
    assert "trainer.tensor_parallel_size=" in text
    as_json = _cli(*ONE_B, "model.vocab_size=50304", "--search", "--nodes", "1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["layouts"][0]["step_s"] <= data["layouts"][-1]["step_s"]
    assert data["launch"].startswith("launch/torchrun.sh 8 ")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        # 3 GPUs: TP and EP must divide 4 heads / 4 experts, PP 2 layers, DP the batch of 16
        (["model=tiny", "--search", "--nodes", "1", "--gpus-per-node", "3"],
         "no layout of 3 GPUs (1 x 3) suits the model"),
        # 37 B parameters on one GPU
        (["model=3b", "trainer=gpu", "model.num_layers=32", "model.hidden_size=4096",
          "model.num_attention_heads=32", "model.ffn_hidden_size=14336",
          "model.moe_ffn_hidden_size=1408", "model.vocab_size=50304", "--search", "--nodes",
          "1", "--gpus-per-node", "1"], "no layout of 1 x 1 H100 fits: the smallest of"),
        (["model=1b", "--search", "--gpu", "V100"], "--gpu=V100 is invalid: expected one of"),
        (["model=1b", "--nodes", "2"], "--nodes needs --search"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(args, message):
    out = _cli(*args)
    assert out.returncode == EXIT_CONFIG_ERROR, out.stdout[-500:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mone-plan: error: "), out.stderr
    assert message in lines[0], lines[0]
