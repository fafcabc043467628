"""Tensor (with sequence) and pipeline parallelism over gloo processes, against one process.

The reference is the same `tiny` job on one process (TP = PP = EP = 1). Weights are drawn by
global name (each tensor-parallel rank cuts its slice from the whole tensor), so every layout
starts from the same model; the layouts then differ only in the order of floating-point sums
(tensor-parallel partial products, gathered sequence chunks), which moves a loss near 5.5 by a
few fp32 ulps. Over 5 steps of the tiny model no routing decision sits that close to a tie, so
plain MoE matches to 1e-5 in the loss and every gradient norm (measured: 3e-7). Pipeline
stages compute exactly what one stage does and match to the last bits.

MoNE: its neuron top-k is per token and does not depend on the layout, but NG-LBL is a
statistic over the tokens an expert receives on its rank, and sequence parallelism gives each
tensor-parallel rank half of every sequence: with NG-LBL on, TP changes the auxiliary loss by
definition (as expert parallelism does), so TP is compared with NG-LBL off. Pipeline stages keep
every token of a micro batch together: there MoNE with NG-LBL matches as tightly as MoE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mone_train.components.checkpoint import CHECKPOINTS
from tests.helpers.distributed import TINY_RUN, free_port, metrics, train

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOL = 1e-5
RUN = [
    *TINY_RUN,
    "trainer.steps=5",
    "trainer.eval_interval=5",
    # 4 micro batches per step on one data-parallel rank: 1F1B's warm-up, steady state and
    # cool-down all run with 2 stages
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.save_interval=0",
]


def _train(run_dir: Path, world_size: int, *extra: str) -> list[dict]:
    train(run_dir, world_size, *RUN, *extra)
    return metrics(run_dir)


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def _assert_same_training(ref: list[dict], other: list[dict], tol: float = TOL) -> None:
    a, b = _steps(ref), _steps(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= tol, (x["step"], x["grad_norm"])
        # job-wide health metrics and megatron's auxiliary loss do not depend on the layout
        assert x["aux_loss"] == pytest.approx(y["aux_loss"], abs=tol)
        for layer in (0, 1):
            assert x[f"load/{layer}/tokens"] == y[f"load/{layer}/tokens"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: MoE, MoNE with NG-LBL, MoNE without."""
    root = tmp_path_factory.mktemp("one_process")
    return {
        "moe": _train(root / "moe", 1, "moe=moe"),
        "mone": _train(root / "mone", 1, "moe=mone"),
        "mone_no_nglbl": _train(root / "mone0", 1, "moe=mone", "moe.ng_lbl_coeff=0"),
        "params": json.loads((root / "mone" / "params.json").read_text()),
    }


def test_tensor_parallel_matches_one_process(tmp_path, reference):
    tp2 = _train(tmp_path / "tp2", 2, "moe=moe", "trainer.tensor_parallel_size=2")
    _assert_same_training(reference["moe"], tp2)
    tp2_mone = _train(
        tmp_path / "tp2_mone", 2, "moe=mone", "moe.ng_lbl_coeff=0",
        "trainer.tensor_parallel_size=2",
    )  # fmt: skip
    _assert_same_training(reference["mone_no_nglbl"], tp2_mone)
    # the parameter counts are the whole model's (slices x TP), as on one process
    assert json.loads((tmp_path / "tp2_mone" / "params.json").read_text()) == reference["params"]


def test_pipeline_parallel_matches_one_process(tmp_path, reference):
    pp2 = _train(tmp_path / "pp2", 2, "moe=moe", "trainer.pipeline_parallel_size=2")
    _assert_same_training(reference["moe"], pp2)
    pp2_mone = _train(tmp_path / "pp2_mone", 2, "moe=mone", "trainer.pipeline_parallel_size=2")
    _assert_same_training(reference["mone"], pp2_mone)
    a, b = _steps(reference["mone"]), _steps(pp2_mone)
    for x, y in zip(a, b):  # NG-LBL and neuron use, both from layers on different stages
        assert x["ng_lbl"] == pytest.approx(y["ng_lbl"], abs=TOL)
        assert x["neurons/1/per_expert"] == y["neurons/1/per_expert"]
    # the evaluation runs through the pipeline too
    val = [r["val_loss"] for r in reference["mone"] if "val_loss" in r]
    assert [r["val_loss"] for r in pp2_mone if "val_loss" in r] == pytest.approx(val, abs=TOL)
    # the parameter counts are the whole model's (both stages'), as on one process
    assert json.loads((tmp_path / "pp2_mone" / "params.json").read_text()) == reference["params"]


def _torchrun(run_dir: Path, nproc: int, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}  # fmt: skip
    env.update(TORCHDYNAMO_DISABLE="1", TORCHRUN=str(BIN / "torchrun"))
    result = subprocess.run(
        ["bash", "launch/torchrun.sh", str(nproc), *RUN, f"trainer.run_dir={run_dir}", *extra],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize(
    "layout,banner",
    [
        (["trainer.tensor_parallel_size=2"], "tensor parallel 2, pipeline parallel 1, expert "
         "parallel 2, data parallel 2"),
        (["trainer.pipeline_parallel_size=2"], "tensor parallel 1, pipeline parallel 2, "
         "expert parallel 2, data parallel 2"),
    ],
    ids=["tp2xep2", "pp2xep2"],
)  # fmt: skip
def test_folded_layouts_train_from_torchrun(tmp_path, reference, layout, banner):
    """4 processes: attention/dense layers TP (or PP) x data parallel 2, experts EP 2 x
    expert data parallel over the same ranks; ZeRO-1 over the data-parallel ranks, and a save
    (a norm's weight is on every TP rank and owned by one DP rank: one main copy of it)."""
    out = _torchrun(tmp_path / "run", 4, "moe=moe", "trainer.expert_parallel_size=2", *layout,
                    "trainer.shard_optimizer=true", "trainer.save_interval=5",
                    "trainer.async_save=false")  # fmt: skip
    assert f"world size 4: {banner}" in out
    _assert_same_training(reference["moe"], metrics(tmp_path / "run"))
    assert all(r["a2a_bytes"] > 0 for r in _steps(metrics(tmp_path / "run")))
    assert (tmp_path / "run" / CHECKPOINTS / "step_00000005").is_dir()


def test_mone_moves_the_bytes_of_moe_under_tensor_parallelism(tmp_path):
    """TP 2 x EP 2 folded on the same 2 ranks: MoNE's token exchange is MoE's, byte for byte
    (the neuron top-k happens after dispatch, on whole experts)."""
    common = ["trainer.tensor_parallel_size=2", "trainer.expert_parallel_size=2",
              "moe.ng_lbl_coeff=0"]  # fmt: skip
    moe = _steps(_train(tmp_path / "moe", 2, "moe=moe", *common))
    mone = _steps(_train(tmp_path / "mone", 2, "moe=mone", *common))
    assert [r["a2a_bytes"] for r in moe] == [r["a2a_bytes"] for r in mone]
    assert all(r["a2a_bytes"] > 0 for r in moe)


@pytest.mark.parametrize(
    "saved", ["trainer.tensor_parallel_size=2", "trainer.pipeline_parallel_size=2"]
)
def test_checkpoint_resumes_at_one_process(tmp_path, reference, saved):
    """Saved at TP 2 (or PP 2) after step 3, resumed on one process: steps 4 and 5 equal the
    uninterrupted run's (dist_checkpointing reshards slices and stages)."""
    run_dir = tmp_path / "run"
    keep = ["moe=moe", "trainer.save_interval=3", "trainer.async_save=false"]
    _train(run_dir, 2, *keep, saved, "trainer.steps=3")
    resumed = _steps(_train(run_dir, 1, *keep))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]  # one metrics file, appended
    for x, y in zip(_steps(reference["moe"])[3:], resumed[3:]):
        assert abs(x["loss"] - y["loss"]) <= TOL, (x["step"], x["loss"], y["loss"])


def _count_collectives(rank: int, world_size: int, port: int, out: str) -> None:
    """Worker: TP 2 x EP 2 on 2 ranks; count the collectives issued while a routed-experts
    module runs forward or backward, and all of them."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHDYNAMO_DISABLE="1")  # fmt: skip
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mone_train.compose import compose_config
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask
    from mone_train.parallel.process_groups import init_distributed

    cfg = compose_config(["model=tiny", "moe=mone", "trainer.tensor_parallel_size=2",
                          "trainer.expert_parallel_size=2"])  # fmt: skip
    info = init_distributed(2, None, 60, 60, 2, 1)
    model, _ = build_model(cfg, 258, info.ep_rank, info.ep_size)
    scopes: list[str] = []  # the hooked modules running now
    counts = {"experts": 0, "attention_qkv": 0, "all": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            counts["all"] += 1
            for scope in set(scopes):
                counts[scope] += 1
            return fn(*args, **kwargs)

        return wrapper

    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
             "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter",
             "all_to_all_single", "all_to_all", "broadcast", "send", "recv", "isend",
             "irecv", "batch_isend_irecv", "barrier")  # fmt: skip
    for name in names:
        setattr(dist, name, counted(getattr(dist, name)))
    for module in (mappings, layers):  # names bound at import
        module.dist_all_gather_func = counted(module.dist_all_gather_func)
        module.dist_reduce_scatter_func = counted(module.dist_reduce_scatter_func)

    def watch(module, scope):
        module.register_forward_pre_hook(lambda *_: scopes.append(scope))
        module.register_forward_hook(lambda *_: scopes.remove(scope))
        module.register_full_backward_pre_hook(lambda *_: scopes.append(scope))
        module.register_full_backward_hook(lambda *_: scopes.remove(scope))

    for module in model.modules():
        if isinstance(module, MoELayer):
            watch(module.experts, "experts")
    # the control: a sequence-parallel column-parallel layer gathers inside itself
    watch(model.module.decoder.layers[0].self_attention.linear_qkv, "attention_qkv")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 258, (2, 32), generator=generator)
    positions = torch.arange(32).expand(2, 32)
    loss = model(tokens, positions, causal_mask(32, info.device), labels=tokens).mean()
    loss.backward()
    if rank == 0:
        Path(out).write_text(json.dumps(counts))
    dist.barrier()
    dist.destroy_process_group()


def test_no_collective_runs_inside_an_expert(tmp_path):
    """Experts stay whole (expert tensor parallel 1): under TP 2 x EP 2 the collectives are the
    attention's sequence-parallel gathers and the dispatcher's all-to-alls, none inside the
    experts' forward or backward."""
    import torch.multiprocessing as mp

    out = tmp_path / "counts.json"
    mp.spawn(_count_collectives, args=(2, free_port(), str(out)), nprocs=2)
    counts = json.loads(out.read_text())
    assert counts["attention_qkv"] > 0, counts  # the counter sees collectives inside a module
    assert counts["experts"] == 0, counts
