"""Shared test set-up: CPU patches, no torch.compile, and megatron-core process groups."""

from __future__ import annotations

import os

# megatron's jit_fuser is torch.compile: 10-20 s per first call on CPU and nothing to test.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before
# triton is imported. The trainer's `auto` choice stays the PyTorch reference on CPU.
if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
