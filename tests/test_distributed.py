"""Expert and data parallelism over 2 gloo processes, against 1-process and EP = 1 runs."""

from __future__ import annotations

import pytest

from tests.helpers.distributed import TINY_RUN, metrics, run_processes

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

TINY = [*TINY_RUN, "trainer.steps=5", "trainer.eval_interval=5"]


def _train(tmp_path, name, world_size, *extra):
    run_dir = tmp_path / name
    overrides = [*TINY, f"trainer.run_dir={run_dir}", *extra]
    if world_size == 1:
        from mone_train.compose import compose_config
        from mone_train.trainer import run

        run(compose_config(overrides))
    else:
        run_processes(world_size, overrides)
    return metrics(run_dir)


def _losses(records):
    return [r["loss"] if "loss" in r else r["val_loss"] for r in records]


@pytest.mark.parametrize("flavour", ["moe", "mone"])
def test_expert_parallel_matches_data_parallel(tmp_path, flavour):
    """5 steps, losses within 1e-5 (about 20 fp32 ulps of a loss near 5): the layouts differ
    only in the order of floating-point sums, so the weights differ in the last bits at most.
    A last-bit difference changes a discrete choice (a token's experts, or for MoNE its K-th
    neuron) only when two scores are within that bit of each other, which over a few steps of
    the tiny model (a few thousand token-expert rows) is improbable; hence 5 steps, not more.
    The same reason makes the health metrics (counts of those choices) exactly equal."""
    # NG-LBL is a statistic over the tokens an expert receives on its rank, so it differs
    # between layouts by definition; the neuron top-k itself is per token and must not.
    common = [
        f"moe={flavour}",
        "moe.ng_lbl_coeff=0",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_size=8",
    ]
    ep1 = _train(tmp_path, "ep1", 2, *common, "trainer.expert_parallel_size=1")
    ep2 = _train(tmp_path, "ep2", 2, *common, "trainer.expert_parallel_size=2")
    assert len(ep1) == len(ep2) == 6
    for a, b in zip(_losses(ep1), _losses(ep2)):
        assert abs(a - b) <= 1e-5, (_losses(ep1), _losses(ep2))
    ep1_bytes = [r["a2a_bytes"] for r in ep1 if "a2a_bytes" in r]
    ep2_bytes = [r["a2a_bytes"] for r in ep2 if "a2a_bytes" in r]
    assert len(ep1_bytes) == len(ep2_bytes) == 5  # one training record per step
    assert all(b == 0 for b in ep1_bytes) and all(b > 0 for b in ep2_bytes)
    # Health metrics are job-wide: expert load and neuron use do not depend on the layout.
    pairs = 8 * 32 * 2  # global batch x sequence x top-k, per step (log interval 1)
    for a, b in zip(ep1, ep2):
        if "loss" not in a:
            continue
        for layer in (0, 1):
            assert a[f"load/{layer}/tokens"] == b[f"load/{layer}/tokens"]
            assert sum(b[f"load/{layer}/tokens"]) == pairs
            if flavour == "mone":
                assert a[f"neurons/{layer}/per_expert"] == b[f"neurons/{layer}/per_expert"]
                assert len(b[f"neurons/{layer}/per_expert"]) == 4
            else:
                assert f"neurons/{layer}/per_expert" not in b


def test_two_data_parallel_ranks_match_one_process_with_twice_the_batch(tmp_path):
    """5 steps (default moe=mone), losses within 1e-5 (about 20 fp32 ulps of a loss near 5):
    both layouts sum the same gradients in another order, so the weights differ in the last
    bits at most; that flips a token's K-th neuron only when two |SiLU(gate)| values are within
    that bit of each other, improbable over a few steps of the tiny model (a few thousand
    token-expert rows); hence 5 steps, not more."""
    no_aux = ["model.aux_loss_coeff=0", "moe.ng_lbl_coeff=0"]
    single = _train(
        tmp_path, "one", 1, *no_aux, "trainer.micro_batch_size=8", "trainer.global_batch_size=8"
    )
    double = _train(
        tmp_path, "two", 2, *no_aux, "trainer.micro_batch_size=4", "trainer.global_batch_size=8"
    )
    assert len(single) == len(double) == 6  # 5 training records and one evaluation
    for a, b in zip(_losses(single), _losses(double)):
        assert abs(a - b) <= 1e-5, (_losses(single), _losses(double))


def test_all_to_all_volume_of_mone_equals_moe(tmp_path):
    common = [
        "trainer.micro_batch_size=4",
        "trainer.global_batch_size=8",
        "trainer.expert_parallel_size=2",
    ]
    moe = _train(tmp_path, "moe", 2, "moe=moe", *common)
    mone = _train(tmp_path, "mone", 2, "moe=mone", *common)
    moe_bytes = [r["a2a_bytes"] for r in moe if "a2a_bytes" in r]
    mone_bytes = [r["a2a_bytes"] for r in mone if "a2a_bytes" in r]
    assert len(moe_bytes) == 5  # one training record per step
    assert moe_bytes == mone_bytes and all(b > 0 for b in moe_bytes)
