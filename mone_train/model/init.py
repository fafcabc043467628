"""Parameter initialisation that does not depend on the parallel layout.

megatron-core's CPU initialisation draws every rank's local experts from the same generator
stream, so with expert parallelism the experts of rank 1 start as copies of rank 0's, and any
change of layout changes every later draw. Here each parameter is drawn from its own generator,
seeded by the run seed and the parameter's *global* name (local expert i on EP rank r is global
expert r * num_local + i; local layer i of pipeline stage s is layer s * layers per stage + i),
and a tensor-parallel rank draws the whole tensor and keeps its slice. The same model therefore
starts identical at any TP, PP and EP, on any number of processes, and MoE and MoNE runs of one
seed start from the same weights.

The distributions are megatron-core's: N(0, std) for weights, N(0, std / sqrt(2 * layers)) for
the two output projections of each block (attention ``linear_proj``, MLP/expert ``linear_fc2``),
norm scales left at one.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_LOCAL_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)\.")
_SCALED = ("linear_proj.weight", "linear_fc2.weight")
_GATED_FC1 = "linear_fc1.weight"  # [gate; up]: each tensor-parallel rank holds [gate_r; up_r]


@dataclass(frozen=True)
class TensorLayout:
    """This rank's tensor-parallel slice of the whole model."""

    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def current(cls) -> TensorLayout:
        """This process's layout, from megatron-core's parallel state."""
        from megatron.core import parallel_state

        return cls(
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        )


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of the first decoder layer of ``model`` (non-zero on later pipeline
    stages); megatron's ``layer_number`` is global and 1-based."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return int(layers[0].layer_number) - 1 if layers else 0


def global_parameter_name(
    name: str, ep_rank: int, num_local_experts: int, layer_offset: int = 0
) -> str:
    """``...local_experts.<i>...`` -> ``...experts.<ep_rank * num_local_experts + i>...`` and,
    on a pipeline stage, ``decoder.layers.<i>.`` -> ``decoder.layers.<layer_offset + i>.``."""
    if layer_offset:
        name = _LOCAL_LAYER.sub(lambda m: f"{m.group(1)}{layer_offset + int(m.group(2))}.", name)
    return _LOCAL_EXPERT.sub(
        lambda m: f".global_experts.{ep_rank * num_local_experts + int(m.group(1))}.", name
    )


def tensor_parallel_slice(
    full: torch.Tensor, param: torch.nn.Parameter, name: str, layout: TensorLayout
) -> torch.Tensor:
    """This rank's part of the whole tensor ``full`` of ``param`` (megatron's layout: chunks
    along ``partition_dim``; a gated fc1 splits its gate and up halves apart)."""
    if not is_tensor_split(param, layout.tp_size):
        return full
    dim, tp, r = param.partition_dim, layout.tp_size, layout.tp_rank
    if name.endswith(_GATED_FC1):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[r], up.chunk(tp, dim=dim)[r]], dim=dim)
    return full.chunk(tp, dim=dim)[r]


def is_tensor_split(param: torch.nn.Parameter, tp_size: int) -> bool:
    """Whether ``param`` is a tensor-parallel slice (experts never are: ETP = 1)."""
    return (
        tp_size > 1
        and getattr(param, "tensor_model_parallel", False)
        and getattr(param, "allreduce", True)
    )


@torch.no_grad()
def init_parameters_by_name(
    model: torch.nn.Module,
    seed: int,
    std: float,
    num_layers: int,
    ep_rank: int,
    num_local_experts: int,
    layout: TensorLayout = TensorLayout(),
) -> None:
    """Re-draw every weight of ``model`` from a generator keyed by (seed, global name); a
    tensor-parallel slice is cut from the whole tensor drawn so."""
    scaled_std = std / math.sqrt(2.0 * num_layers)
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        if param.dim() < 2 or param.device.type == "meta":
            continue  # norm scales (ones) and biases (zeros) keep megatron's values
        key = global_parameter_name(name, ep_rank, num_local_experts, offset)
        generator = torch.Generator(device=param.device)
        generator.manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        shape = list(param.shape)
        if is_tensor_split(param, layout.tp_size):
            shape[param.partition_dim] *= layout.tp_size
        full = torch.empty(shape, dtype=param.dtype, device=param.device)
        full.normal_(0.0, scaled_std if key.endswith(_SCALED) else std, generator=generator)
        param.copy_(tensor_parallel_slice(full, param, name, layout))
