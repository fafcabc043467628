"""Shared test set-up: CPU patches, no torch.compile, and megatron-core process groups.

Every test computes on the CPU unless it asks for CUDA: MONE_TRAIN_DEVICE=cpu makes
``trainer.device=auto`` (and ``init_distributed``'s default) the CPU in this process and in every
process it starts, also on a machine with a GPU. The `gpu` tier (tests/test_gpu.py, `make
test-gpu`) names CUDA itself; it runs last, after the CPU patches are taken out again, and is
skipped without a GPU. MONE_TEST_GPU_TIER=cpu runs that tier on the CPU instead, at toy sizes
(benchmarks/gpu_check.sh with DRY_RUN=1 does so to check its steps).
"""

from __future__ import annotations

import os

# megatron's jit_fuser is torch.compile: 10-20 s per first call on CPU and nothing to test.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["MONE_TRAIN_DEVICE"] = "cpu"
# Under pytest-xdist (`make test` runs 2 workers) the workers share the cores: torch threads per
# worker = cores / workers, in every process they start too, or they oversubscribe them (two
# torch processes with a thread per core each on 2 cores run several times slower).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
GPU_TIER_DEVICE = os.environ.get("MONE_TEST_GPU_TIER", "cuda")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before
# triton is imported. The trainer's `auto` choice stays the PyTorch reference on CPU.
if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_gpu = pytest.mark.skipif(
    GPU_TIER_DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


def pytest_collection_modifyitems(config, items):
    """The `gpu` tier last (CPU tests first, in their usual order), skipped without a GPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    items[:] = [item for item in items if not item.get_closest_marker("gpu")] + gpu
    for item in gpu:
        item.add_marker(requires_gpu)


@pytest.fixture(autouse=True)
def _cuda_without_cpu_patches(request):
    """A `gpu` test on CUDA starts without the CPU patches earlier CPU tests installed."""
    if request.node.get_closest_marker("gpu") and GPU_TIER_DEVICE == "cuda":
        from mone_train.parallel import cpu_compat
        from mone_train.parallel.process_groups import shutdown_distributed

        shutdown_distributed()
        cpu_compat.restore()
    yield


@pytest.fixture(autouse=True)
def _fresh_aux_loss_tracker():
    """megatron's auxiliary-loss tracker is one per process, sized by the first model that
    records into it (its layers, MTP's included): every test starts without one, whichever
    tests its process ran before (pytest-xdist orders them differently)."""
    import sys

    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
    yield


@pytest.fixture
def megatron_single():
    """A 1-process gloo group with megatron-core's parallel state (EP = 1)."""
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed

    info = init_distributed(1)
    yield info
    shutdown_distributed()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The default stdlib corpus, built once per test session in the user cache."""
    from mone_train.compose import compose_config
    from mone_train.data.corpus import prepare_stdlib_corpus

    cfg = compose_config([])
    return prepare_stdlib_corpus(cfg.data.cache_dir, cfg.data.valid_every)
