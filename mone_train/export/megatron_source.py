"""A mone-train checkpoint as a megatron-core GPTModel in this process, for conversion.

The model is rebuilt from the resolved config in the checkpoint's ``COMPLETE.json`` at expert
parallel size 1 (``dist_checkpointing`` reshards a checkpoint saved at any EP size on load) and
only its weights are read; the optimizer moments stay on disk. A one-process gloo group is
started for megatron's parallel state unless the caller already has one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mone_train.components.checkpoint import (
    config_from_marker,
    load_model_weights,
    read_marker,
    resolve_checkpoint,
)
from mone_train.config import Config, one_process_layout
from mone_train.export.errors import ExportError
from mone_train.model.builder import build_gpt_model, recipe_settings
from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
from mone_train.runtime import configure_torch


@dataclass
class MegatronCheckpoint:
    """A loaded checkpoint: where it is, its step, the run's config and the built model."""

    path: Path
    step: int | None
    cfg: Config
    vocab_size: int
    model: torch.nn.Module


def describe_checkpoint(path: Path, key: str = "checkpoint") -> tuple[Path, dict, Config]:
    """(checkpoint folder, marker, config) of a run directory or checkpoint, without loading
    any tensor. Raises CheckpointError (a ConfigError) naming ``key`` for a bad path."""
    checkpoint = resolve_checkpoint(Path(path), key=key)
    marker = read_marker(checkpoint)
    cfg = config_from_marker(checkpoint, marker)
    one_process_layout(cfg)  # dist_checkpointing reshards the saved layout
    return checkpoint, marker, cfg


# The recipe settings (builder.recipe_settings) that change the forward pass of a trained model;
# the export reproduces each as the config says. Token dropping (capacity) is training-time only.
REPRODUCED_RECIPE = (
    "moe_layer_freq", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_enable_expert_bias", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "qk_layernorm", "add_qkv_bias", "layernorm_epsilon",
)  # fmt: skip


def check_semantics(model: torch.nn.Module, cfg: Config) -> None:
    """Raise ExportError if the built model differs from what the exported code reproduces."""
    config = model.config
    expected = {
        "normalization": "RMSNorm",
        "add_bias_linear": False,
        "gated_linear_unit": True,
        "rotary_interleaved": False,
        "moe_apply_probs_on_input": False,
        "moe_input_jitter_eps": None,
        "softmax_scale": None,
        "apply_query_key_layer_scaling": False,
        "apply_residual_connection_post_layernorm": False,
    }
    recipe = recipe_settings(cfg)
    expected.update({name: recipe[name] for name in REPRODUCED_RECIPE})
    found = {name: getattr(config, name, None) for name in expected}
    found["rotary_base"] = getattr(model, "rotary_base", None)
    found["rotary_percent"] = getattr(model, "rotary_percent", None)
    expected.update(rotary_base=cfg.model.rotary_base, rotary_percent=1.0)
    differing = [f"{k}={found[k]!r} (expected {v!r})" for k, v in expected.items() if found[k] != v]
    if differing:
        raise ExportError(
            "the model uses megatron settings the export does not reproduce: "
            + "; ".join(differing)
        )


@contextlib.contextmanager
def megatron_checkpoint(path: Path, key: str = "checkpoint") -> Iterator[MegatronCheckpoint]:
    """The checkpoint's GPTModel (eval mode, all experts local) while the context is open."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    checkpoint, marker, cfg = describe_checkpoint(path, key)
    vocab_size = (marker.get("signature") or {}).get("vocab_size") or cfg.model.vocab_size
    if vocab_size is None:
        raise ExportError(f"{key} {checkpoint}: the marker records no vocabulary size")
    configure_torch(cfg)
    own_group = not dist.is_initialized()
    try:
        init_distributed(1)
        torch.manual_seed(cfg.trainer.seed)
        model_parallel_cuda_manual_seed(cfg.trainer.seed)
        model = build_gpt_model(cfg, vocab_size)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        load_model_weights(checkpoint, model, key=key)
        check_semantics(model, cfg)
        yield MegatronCheckpoint(checkpoint, marker.get("step"), cfg, int(vocab_size), model.eval())
    finally:
        if own_group:
            shutdown_distributed()


def read_weights(path: Path, key: str = "checkpoint") -> tuple[MegatronCheckpoint, dict]:
    """(checkpoint without its model, CPU state dict of the GPTModel) of ``path``."""
    with megatron_checkpoint(path, key) as loaded:
        state = {
            name: tensor.detach().cpu()
            for name, tensor in loaded.model.state_dict().items()
            if torch.is_tensor(tensor)
        }
        loaded.model = None
    return loaded, state
