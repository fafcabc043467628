"""trainer.shard_optimizer (ZeRO-1) on 2 gloo processes: same losses, half the optimizer state,
checkpoints that resume and reshard (DP 2 -> 1, EP 2 -> 1)."""

from __future__ import annotations

import json

import pytest

from mone_train.components.checkpoint import CHECKPOINTS
from tests.helpers.distributed import TINY_RUN, losses, metrics, train

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

BATCH = ["trainer.micro_batch_size=4", "trainer.global_batch_size=8"]


def _train(run_dir, world_size, *extra):
    train(run_dir, world_size, *BATCH, *extra)
    return metrics(run_dir)


def _state_bytes(run_dir):
    return json.loads((run_dir / "FINISHED.json").read_text())["optimizer_state_bytes"]


@pytest.mark.parametrize("ep,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_sharded_state_trains_like_unsharded_with_half_the_bytes(tmp_path, ep, precision):
    common = ["trainer.steps=10", f"trainer.expert_parallel_size={ep}",
              f"trainer.precision={precision}"]  # fmt: skip
    _train(tmp_path / "full", 2, *common)
    _train(tmp_path / "sharded", 2, *common, "trainer.shard_optimizer=true")
    # the same arithmetic, each weight updated by its owner
    assert losses(tmp_path / "sharded") == losses(tmp_path / "full")
    full_bytes, sharded_bytes = _state_bytes(tmp_path / "full"), _state_bytes(tmp_path / "sharded")
    assert full_bytes[0] == full_bytes[1]
    if ep == 1:  # dense and expert state both split over the 2 data-parallel ranks
        assert sum(sharded_bytes) == full_bytes[0]
        assert max(sharded_bytes) <= 0.55 * full_bytes[0], (sharded_bytes, full_bytes)
    else:  # dense state split; each rank's own experts' state stays (expert DP is 1)
        from mone_train.compose import compose_config
        from mone_train.planning.plan import parameter_numbers, shape_of

        cfg = compose_config([*TINY_RUN, *BATCH, *common])
        dense = parameter_numbers(shape_of(cfg, 258, ep_size=2)).dense
        per_weight = 8 if precision == "fp32" else 12  # moments (+ the fp32 master)
        assert sum(full_bytes) - sum(sharded_bytes) == per_weight * dense
        assert all(s < f for s, f in zip(sharded_bytes, full_bytes))


@pytest.mark.parametrize("ep,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_sharded_checkpoints_resume_bit_exact_and_reshard_to_one_process(tmp_path, ep, precision):
    """bf16: a rank that does not own a weight has no fp32 master of it; its copy is saved (as
    a replica) and loaded in fp32 all the same."""
    common = [f"trainer.expert_parallel_size={ep}", "trainer.shard_optimizer=true",
              f"trainer.precision={precision}"]  # fmt: skip
    straight = _train(tmp_path / "straight", 2, *common, "trainer.steps=20")
    _train(tmp_path / "resumed", 2, *common, "trainer.steps=10", "trainer.save_interval=10")
    _train(tmp_path / "resumed", 2, *common, "trainer.steps=20",
                     "trainer.save_interval=10")  # fmt: skip
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")

    # One process (DP 1, EP 1, unsharded) reads the sharded state and goes on: step 11's loss
    # shows the weights came along, step 12's (after one update) the optimizer moments too;
    # equal to the 2-process run up to summation order.
    checkpoint = tmp_path / "resumed" / CHECKPOINTS / "step_00000010"
    one = _train(tmp_path / "one", 1, "trainer.steps=12", f"trainer.resume={checkpoint}",
                 "trainer.micro_batch_size=8", f"trainer.precision={precision}")  # fmt: skip
    reference = {r["step"]: r["loss"] for r in straight if "loss" in r}
    got = {r["step"]: r["loss"] for r in one if "loss" in r}
    assert sorted(got) == [11, 12]
    # bf16: the same fp32 weights, but activations rounded to 2^-9 relative in another
    # micro-batch split; the 10 steps before moved the loss by far more than this bound
    tol = 1e-4 if precision == "fp32" else 1e-2
    assert abs(reference[1] - reference[10]) > 10 * tol
    for step in (11, 12):
        assert abs(got[step] - reference[step]) < tol, (step, got, reference)
