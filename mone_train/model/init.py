"""Parameter initialisation that does not depend on the parallel layout.

megatron-core's CPU initialisation draws every rank's local experts from the same generator
stream, so with expert parallelism the experts of rank 1 start as copies of rank 0's, and any
change of layout changes every later draw. Here each parameter is drawn from its own generator,
seeded by the run seed and the parameter's *global* name (local expert i on EP rank r is global
expert r * num_local + i). The same model therefore starts identical at EP = 1, 2, 4 ..., on any
number of processes, and MoE and MoNE runs of one seed start from the same weights.

The distributions are megatron-core's: N(0, std) for weights, N(0, std / sqrt(2 * layers)) for
the two output projections of each block (attention ``linear_proj``, MLP/expert ``linear_fc2``),
norm scales left at one.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def global_parameter_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    """``...local_experts.<i>...`` -> ``...experts.<ep_rank * num_local_experts + i>...``."""
    return _LOCAL_EXPERT.sub(
        lambda m: f".global_experts.{ep_rank * num_local_experts + int(m.group(1))}.", name
    )


@torch.no_grad()
def init_parameters_by_name(
    model: torch.nn.Module,
    seed: int,
    std: float,
    num_layers: int,
    ep_rank: int,
    num_local_experts: int,
) -> None:
    """Re-draw every weight of ``model`` from a generator keyed by (seed, global name)."""
    scaled_std = std / math.sqrt(2.0 * num_layers)
    for name, param in model.named_parameters():
        if param.dim() < 2 or param.device.type == "meta":
            continue  # norm scales (ones) and biases (zeros) keep megatron's values
        key = global_parameter_name(name, ep_rank, num_local_experts)
        generator = torch.Generator(device=param.device)
        generator.manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        param.normal_(0.0, scaled_std if key.endswith(_SCALED) else std, generator=generator)
