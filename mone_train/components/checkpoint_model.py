"""A checkpoint opened as a one-process megatron-core GPTModel: the one way export, generation
and the analysis tools rebuild a trained (or imported) model.

The model is rebuilt from the resolved config in the checkpoint's ``COMPLETE.json`` at
TP = PP = EP = 1 (``dist_checkpointing`` reshards a checkpoint saved at any layout on load) and
only its weights are read; the optimizer moments stay on disk. A one-process gloo group is
started for megatron's parallel state unless the caller already has one (and closed with the
model). With ``meta=True`` nothing is allocated or read: the model's names, shapes and sharded
state dict, for code that streams the weights itself (mone-export).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from mone_train.components.checkpoint import (
    CheckpointError,
    config_from_marker,
    load_model_weights,
    read_marker,
    resolve_checkpoint,
    single_threaded_collectives,
)
from mone_train.config import Config, one_process_layout
from mone_train.errors import first_line
from mone_train.model.builder import build_gpt_model
from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
from mone_train.runtime import configure_torch


@dataclass
class CheckpointModel:
    """An opened checkpoint: where it is, its step, the run's config and the built model."""

    path: Path
    step: int | None
    cfg: Config
    vocab_size: int
    model: torch.nn.Module | None
    device: torch.device
    own_group: bool = False

    def close(self) -> None:
        """Tear down the process group if opening the checkpoint started it."""
        if self.own_group:
            shutdown_distributed()
            self.own_group = False


def describe_checkpoint(path: Path, key: str = "checkpoint") -> tuple[Path, dict, Config]:
    """(checkpoint folder, marker, config at one process) of a run directory or checkpoint,
    without loading any tensor. Raises CheckpointError (a ConfigError) naming ``key``."""
    checkpoint = resolve_checkpoint(Path(path), key=key)
    marker = read_marker(checkpoint)
    cfg = config_from_marker(checkpoint, marker)
    one_process_layout(cfg)  # dist_checkpointing reshards the saved layout
    return checkpoint, marker, cfg


def saved_vocab_size(marker: dict, cfg: Config) -> int | None:
    """The vocabulary the checkpoint's model was built with (None when it records none)."""
    return (marker.get("signature") or {}).get("vocab_size") or cfg.model.vocab_size


def open_checkpoint_model(
    path: Path,
    key: str = "checkpoint",
    *,
    meta: bool = False,
    device: str = "auto",
    vocab_size: int | None = None,
) -> CheckpointModel:
    """Build the checkpoint's GPTModel (eval mode, all experts local) and load its weights.

    ``device``: "cpu", "cuda" or "auto" (the GPU when there is one); a CheckpointError when
    megatron would run elsewhere. ``vocab_size``: used when the checkpoint records none.
    Errors are CheckpointError naming ``key`` and the path; close the result when done.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    checkpoint, marker, cfg = describe_checkpoint(path, key)
    vocab = saved_vocab_size(marker, cfg) or vocab_size
    if vocab is None:
        raise CheckpointError(f"{key} {checkpoint}: the marker records no vocabulary size")
    configure_torch(cfg)
    opened = CheckpointModel(checkpoint, marker.get("step"), cfg, int(vocab), None,
                             torch.device("cpu"), own_group=not dist.is_initialized())  # fmt: skip
    try:
        opened.device = init_distributed(1, device=device).device
        if device != "auto" and opened.device.type != device:
            raise CheckpointError(
                f"--device {device}: megatron-core runs this checkpoint on "
                f"{opened.device.type} here (hide GPUs with --device cpu)"
            )
        torch.manual_seed(cfg.trainer.seed)
        model_parallel_cuda_manual_seed(cfg.trainer.seed)
        model = build_gpt_model(cfg, opened.vocab_size, meta=meta)
        if not meta:
            if opened.device.type == "cuda":
                model.cuda(torch.cuda.current_device())
            load_model_weights(checkpoint, model, key=key)
        opened.model = model.eval()
    except BaseException:
        opened.close()
        raise
    return opened


@contextlib.contextmanager
def checkpoint_model(path: Path, key: str = "checkpoint", **options) -> Iterator[CheckpointModel]:
    """:func:`open_checkpoint_model` while the context is open."""
    opened = open_checkpoint_model(path, key, **options)
    try:
        yield opened
    finally:
        opened.close()


def weight_entries(sharded: dict) -> dict:
    """The weights of a model's sharded state dict (name -> ShardedTensor, or the factory of
    a gated expert's fc1), without the ``_extra_state`` objects."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    kinds = (ShardedTensor, ShardedTensorFactory)
    return {name: value for name, value in sharded.items() if isinstance(value, kinds)}


@single_threaded_collectives
def load_weight_group(path: Path, group: dict, key: str = "checkpoint") -> dict:
    """Some of checkpoint ``path``'s weights, read now as fp32 CPU tensors (name -> tensor).

    ``group``: entries of :func:`weight_entries` of a meta-device model's sharded state dict
    (left as they are); a checkpoint saved at any layout, in any dtype, reads into them."""
    from megatron.core import dist_checkpointing

    wanted = {}
    for name, value in group.items():
        value = copy.copy(value)
        value.data = torch.empty(value.data.shape, dtype=torch.float32)
        wanted[name] = value
    try:
        return dist_checkpointing.load({"model": wanted}, str(path))["model"]
    except (Exception, CheckpointException) as err:  # truncated files fail in many ways
        raise CheckpointError(
            f"{key} {path}: the weights cannot be loaded ({first_line(err)})"
        ) from None
