"""One megatron-core code path per CPU patch, each of which fails on CPU without that patch.

Used in-process (with every patch on: the path works) and in a subprocess with all patches but
one (the path must fail with the error the patch exists for). Run as a script:

    python tests/helpers/cpu_probes.py <patch-name-to-leave-out>

prints ``FAILED <ExceptionType>: <message>`` or ``OK``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _tiny_config():
    from mone_train.config import Config
    from mone_train.model.builder import transformer_config

    cfg = Config()
    cfg.model.hidden_size = 16
    cfg.model.num_experts = 2
    cfg.model.moe_ffn_hidden_size = 8
    return transformer_config(cfg)


def probe_rng_tracker() -> None:
    """Attention forks the model-parallel RNG; recompute snapshots every RNG state."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.model_parallel_cuda_manual_seed(7)
    tracker = mp_random.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork leaked into the default generator"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "a forked stream must advance"
    states = mp_random._get_all_rng_states()
    mp_random._set_all_rng_states(*states)
    mp_random.model_parallel_cuda_manual_seed(7)
    with mp_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first), "the same seed must give the same stream"


def probe_current_device() -> None:
    """Rotary embeddings (like the router) move their tensors to the current CUDA device."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)(6)
    assert emb.device.type == "cpu" and emb.shape[0] == 6


def probe_streams() -> None:
    """The alltoall dispatcher creates a CUDA stream for its device-to-host copies; the
    checkpoint writer synchronizes the device after staging tensors."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
    dispatcher = MoEAlltoAllTokenDispatcher(
        2, [0, 1], _tiny_config(), pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    stream = dispatcher.cuda_dtoh_stream
    with torch.cuda.stream(stream):
        pass
    stream.record_event().synchronize()
    assert FileSystemWriterAsync.preload_tensors([], non_blocking=True) == []


def probe_te_names() -> None:
    """The fp32 router gating checks TransformerEngine's GEMM by name."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    out = router_gating_linear(x, w, None, torch.float32)
    out.sum().backward()
    torch.testing.assert_close(out, x @ w.t())


def probe_alltoall_splits() -> None:
    """all_to_all_single needs split sizes as lists or numpy arrays, not CPU tensors."""
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(
        torch.tensor([3] * dist.get_world_size()), as_numpy=True
    )
    data = torch.arange(3 * dist.get_world_size(), dtype=torch.float32)
    out = torch.empty_like(data)
    dist.all_to_all_single(out, data, output_split_sizes=splits, input_split_sizes=splits)


def probe_schedule_tokens() -> None:
    """megatron's schedules count the loss's tokens in a tensor they put on "cuda"."""
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import schedules

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _tiny_config()
            self.model_type = ModelType.encoder_or_decoder
            self.weight = torch.nn.Parameter(torch.ones(2))

        def set_input_tensor(self, tensor):
            pass

        def forward(self, x):
            return self.weight * x

    def forward_step(data_iterator, model):
        out = model(next(data_iterator))
        return out, lambda o: (o.sum(), torch.tensor(2, dtype=torch.int), {"sum": o.detach()})

    schedules.forward_backward_no_pipelining(
        forward_step_func=forward_step,
        data_iterator=iter([torch.ones(2)]),
        model=[Stage()],
        num_microbatches=1,
        seq_length=2,
        micro_batch_size=1,
        forward_only=True,
    )


def probe_mla_te_stubs() -> None:
    """Building a multi-latent attention layer checks its output projection against TE's."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from mone_train.model.attention import SDPAttention

    base = _tiny_config()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    fields.update(
        kv_channels=None, apply_rope_fusion=False, num_moe_experts=None, moe_ffn_hidden_size=None
    )
    config = MLATransformerConfig(**fields, q_lora_rank=None, kv_lora_rank=8, qk_head_dim=4,
                                  qk_pos_emb_head_dim=4, v_head_dim=4)  # fmt: skip
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = SDPAttention
    build_module(attention, config=config, layer_number=1)


def probe_embedding_copy() -> None:
    """The last of two pipeline stages with multi-token prediction copies the first stage's
    word embedding at set-up (an all-reduce of its ``.cuda()`` data in megatron)."""
    from types import SimpleNamespace

    from megatron.core.models.common.language_module.language_module import LanguageModule

    class LastOfTwo:  # what megatron's pipeline helpers ask of the stage's group
        def rank(self):
            return 1

        def size(self):
            return 2

    class LastStage:  # the attributes megatron's set-up reads, on the MTP stage
        pre_process, post_process, mtp_process = False, True, True
        share_embeddings_and_output_weights = False
        vp_stage = vp_size = None

        def __init__(self):
            self.config = SimpleNamespace(mtp_num_layers=1, pipeline_model_parallel_size=2)
            self.pp_group, self.embd_group = LastOfTwo(), dist.group.WORLD
            self.output_layer = SimpleNamespace(weight=torch.nn.Parameter(torch.ones(2)))
            self.embedding = torch.nn.Parameter(torch.ones(4, 2))

        def shared_embedding_or_output_weight(self):
            return self.embedding

        def _is_in_embd_group(self):
            return True

    stage = LastStage()
    LanguageModule.setup_embeddings_and_output_layer(stage)
    assert stage.embedding.shared and float(stage.embedding.detach().sum()) == 0.0  # zeroed, summed


PROBES = {
    "rng_tracker": probe_rng_tracker,
    "current_device": probe_current_device,
    "streams": probe_streams,
    "te_names": probe_te_names,
    "alltoall_splits": probe_alltoall_splits,
    "schedule_tokens": probe_schedule_tokens,
    "mla_te_stubs": probe_mla_te_stubs,
    "embedding_copy": probe_embedding_copy,
}


def _run_without(left_out: str) -> str:
    from megatron.core import parallel_state

    from mone_train.parallel import cpu_compat

    cpu_compat.apply(only=tuple(p for p in cpu_compat.PATCHES if p != left_out))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        PROBES[left_out]()
    except Exception as err:  # the point: report whatever megatron raised
        return f"FAILED {type(err).__name__}: {err}"
    return "OK"


if __name__ == "__main__":
    print(_run_without(sys.argv[1]).splitlines()[0])
