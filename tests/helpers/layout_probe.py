"""Build a model for every rank of a TP x PP x EP layout in this one process, on the meta device,
with torch's fake process group standing in for the other ranks (collectives do nothing;
megatron-core's parallel state forms the real layout). Prints, per rank, its place and the
parameters it holds, as JSON lines:

    python tests/helpers/layout_probe.py WORLD_SIZE [hydra overrides ...]

The planner's per-device counts are tested against these (tests/test_plan.py).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def probe(world_size: int, overrides: list[str]) -> list[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mone_train.compose import compose_config
    from mone_train.config import model_vocab_size
    from mone_train.model.builder import build_gpt_model
    from mone_train.parallel import cpu_compat

    cpu_compat.apply()
    cfg = compose_config(overrides)
    t = cfg.trainer
    rows = []
    for rank in range(world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        parallel_state.initialize_model_parallel(
            t.tensor_parallel_size,
            t.pipeline_parallel_size,
            expert_model_parallel_size=t.expert_parallel_size,
            expert_tensor_parallel_size=1,
            create_gloo_process_groups=False,
        )
        with torch.device("meta"):
            model = build_gpt_model(cfg, model_vocab_size(cfg, 258))  # the byte tokenizer
        rows.append({
            "rank": rank,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "ep_rank": parallel_state.get_expert_model_parallel_rank(),
            "params": sum(p.numel() for p in model.parameters()),
        })  # fmt: skip
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    for row in probe(int(sys.argv[1]), sys.argv[2:]):
        print(json.dumps(row))
