"""A mone-train checkpoint as a megatron-core GPTModel in this process, for conversion.

Opened by ``mone_train/components/checkpoint_model.py`` (the one place a checkpoint becomes a
one-process model: any saved TP/PP/EP layout, weights only), then checked for settings the
export does not reproduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from mone_train.components.checkpoint_model import (
    CheckpointModel,
    checkpoint_model,
    describe_checkpoint,
)
from mone_train.config import Config
from mone_train.export.errors import ExportError
from mone_train.model.builder import recipe_settings

MegatronCheckpoint = CheckpointModel  # (the name the export and its tests use)
__all__ = ["MegatronCheckpoint", "describe_checkpoint", "megatron_checkpoint", "read_weights"]


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
        "multi_latent_attention": cfg.model.multi_latent_attention,
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
def megatron_checkpoint(
    path: Path, key: str = "checkpoint", meta: bool = False
) -> Iterator[MegatronCheckpoint]:
    """The checkpoint's GPTModel (eval mode, all experts local) while the context is open;
    ``meta``: its shapes only, nothing read."""
    with checkpoint_model(path, key, meta=meta) as loaded:
        check_semantics(loaded.model, loaded.cfg)
        yield loaded


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
