"""Build the megatron-core GPT model whose MoE layers use MoNE experts.

The MoNE experts enter through megatron-core's layer spec: the decoder block spec is megatron's
own (``get_gpt_decoder_block_spec``, local backend), and in its MoE layer spec the ``experts``
submodule's class is swapped for :class:`GroupedMoNEExperts` (``moe.grouped_gemm``; by default
with CUDA) or :class:`MoNEExperts`. Router, token dispatcher, auxiliary loss, expert parallelism and
checkpoint layout therefore stay megatron-core's. With ``model.attention=sdpa`` the
self-attention's ``core_attention`` submodule is :class:`SDPAttention` (torch's fused
attention) instead of megatron's ``DotProductAttention``; neither holds parameters. With
``model.norm=fused`` the norms (two per layer and the final one) are :class:`RMSNorm` (fused
backward on CPU) instead of megatron's ``WrappedTorchNorm``; same parameter names and values.
``model.rope_fusion`` turns on megatron's RoPE fusion, served on CPU by our one-pass kernel
(:mod:`mone_train.model.rope`); ``model.rope_scaling`` (Llama 3's, YaRN) picks megatron's
scaled rotary embedding. ``model.multi_latent_attention`` (DeepSeek-V2/V3) builds megatron's
own MLA layers (``MLASelfAttention`` under an ``MLATransformerConfig``, :func:`mla_settings`)
with the same swaps: the SDPA core (megatron's local one cannot take MLA's separate key and
value head sizes), our RMSNorm in the two latent norms too, MoNE experts.
``model.mtp_num_layers`` adds megatron's multi-token prediction block on the last pipeline
stage (:func:`mtp_block_spec`: layers like the decoder's last, swaps included).

The MoE recipe of the family (``arch=``: shared experts, router, balancing, dense layers,
QK-norm, token dropping) is megatron-core's own, set through its TransformerConfig
(:func:`recipe_settings`); the spec swaps only what megatron has no module for: MoNE shared
experts (``moe.shared_expert_mone``) and the QK-norm over all heads (``model.qk_layernorm=full``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import MLATransformerConfig

from mone_train.config import Config
from mone_train.model.attention import SDPAttention
from mone_train.model.grouped_experts import GroupedMoNEExperts
from mone_train.model.init import TensorLayout, init_parameters_by_name
from mone_train.model.mone_experts import MoNEExperts
from mone_train.model.norm import RMSNorm
from mone_train.model.qk_norm import FullWidthKeyNorm, FullWidthQueryNorm
from mone_train.model.rope import (
    install_fused_rope,
    mla_rope_settings,
    position_embedding_kwargs,
    scales_cos_sin,
    set_llama3_frequencies,
    yarn_config_attributes,
)
from mone_train.model.shared_experts import MoNESharedExperts
from mone_train.parallel.process_groups import on_cuda


def num_moe_layers(cfg: Config) -> int:
    """Layers that are MoE (``ModelConfig.moe_layer_pattern``), the multi-token prediction
    layers included (each is built like the last decoder layer)."""
    pattern = cfg.model.moe_layer_pattern()
    return sum(pattern) + (cfg.model.mtp_num_layers if pattern[-1] else 0)


def recipe_settings(cfg: Config) -> dict:
    """megatron-core's TransformerConfig fields for the model's MoE recipe (``arch=``)."""
    m = cfg.model
    balancing = m.load_balancing if m.aux_loss_coeff > 0 else "none"
    return {
        "moe_layer_freq": m.moe_layer_pattern(),
        "moe_aux_loss_coeff": m.aux_loss_coeff if balancing != "none" else 0.0,
        "moe_router_load_balancing_type": balancing,
        "moe_z_loss_coeff": m.z_loss_coeff or None,
        "moe_router_score_function": m.router_score,
        "moe_router_pre_softmax": m.router_pre_softmax,
        "moe_router_topk_scaling_factor": m.router_topk_scaling,
        "moe_router_num_groups": m.router_num_groups,
        "moe_router_group_topk": m.router_group_topk,
        "moe_router_enable_expert_bias": m.router_expert_bias,
        "moe_router_bias_update_rate": m.router_bias_update_rate,
        "moe_expert_capacity_factor": m.capacity_factor,
        "moe_token_drop_policy": m.token_drop_policy,
        "moe_pad_expert_input_to_capacity": m.pad_to_capacity,
        "moe_shared_expert_intermediate_size": m.shared_expert_ffn_hidden_size or None,
        "moe_shared_expert_gate": m.shared_expert_gate,
        # MLA's latent norms (always on) sit in megatron's QK-norm slots
        "qk_layernorm": m.qk_layernorm != "none" or m.multi_latent_attention,
        "add_qkv_bias": m.qkv_bias,
        "layernorm_epsilon": m.norm_epsilon,
        "mtp_num_layers": m.mtp_num_layers or None,
        "mtp_loss_scaling_factor": m.mtp_loss_scaling_factor,
    }


def mla_settings(cfg: Config) -> dict:
    """megatron-core's MLATransformerConfig fields (sizes and RoPE) for multi-head latent
    attention (``model.multi_latent_attention``: megatron's local ``MLASelfAttention`` spec,
    our SDPA core and norms, :func:`_swap_layer_spec`); {} without it. megatron's fused MLA
    RoPE is a CUDA kernel: MLA runs RoPE unfused (:func:`transformer_config`)."""
    m = cfg.model
    if not m.multi_latent_attention:
        return {}
    return {
        "multi_latent_attention": True,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_head_dim": m.qk_head_dim,
        "qk_pos_emb_head_dim": m.qk_pos_emb_head_dim,
        "v_head_dim": m.v_head_dim,
        **mla_rope_settings(m),
    }


def recompute_settings(recompute: str) -> dict:
    """megatron-core's activation-recompute switches for ``trainer.recompute``.

    ``moe``: selective recompute of each MoE layer (router, dispatch, experts, combine) in
    backward; ``full``: every transformer layer recomputed, one layer per checkpoint.
    """
    if recompute == "moe":
        return {"recompute_granularity": "selective", "recompute_modules": ["moe"]}
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return {}


def parallel_settings(cfg: Config) -> dict:
    """megatron-core's layout fields: TP with sequence parallelism (megatron's MoE layer needs
    it), PP over equal stages with 1F1B, EP, and experts never tensor-split (ETP = 1)."""
    t = cfg.trainer
    tp, pp = t.tensor_parallel_size, t.pipeline_parallel_size
    return {
        "tensor_model_parallel_size": tp,
        "sequence_parallel": tp > 1,
        "pipeline_model_parallel_size": pp,
        "pipeline_dtype": torch.bfloat16 if t.precision == "bf16" else torch.float32,
        # gloo has no coalesced send/recv: stage-to-stage tensors go as single isend/irecv
        # (megatron orders them by stage parity, so no pair waits on the other); NCCL batches.
        "batch_p2p_comm": on_cuda(),
        "expert_model_parallel_size": t.expert_parallel_size,
        "expert_tensor_parallel_size": 1,
    }


def transformer_config(cfg: Config) -> TransformerConfig:
    """megatron-core TransformerConfig for this run (alltoall dispatcher)."""
    m, t = cfg.model, cfg.trainer
    rope_fusion = m.rope_fusion and not scales_cos_sin(m) and not m.multi_latent_attention
    if rope_fusion:
        install_fused_rope()
    config_class = MLATransformerConfig if m.multi_latent_attention else TransformerConfig
    config = config_class(
        **mla_settings(cfg),
        **recompute_settings(t.recompute),
        **recipe_settings(cfg),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        normalization="RMSNorm",
        apply_rope_fusion=rope_fusion,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        init_method_std=m.init_method_std,
        num_moe_experts=m.num_experts,
        moe_router_topk=m.router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_token_dispatcher_type="alltoall",
        moe_router_dtype="fp32",  # router logits and softmax in fp32, as megatron recommends
        # These fusions need TransformerEngine or the grouped_gemm package (CUDA only); our own
        # grouped experts are chosen by moe.grouped_gemm in the layer spec instead.
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        **parallel_settings(cfg),
        use_cpu_initialization=not on_cuda(),
        # Built and initialised in fp32 always; bf16 runs cast afterwards (to_bf16_with_masters),
        # keeping each weight's exact fp32 value as its master.
        params_dtype=torch.float32,
    )
    # YaRN's parameters: megatron reads them as attributes its TransformerConfig does not declare
    for name, value in yarn_config_attributes(m).items():
        setattr(config, name, value)
    return config


def _experts_module(cfg: Config) -> tuple[type, dict] | None:
    """The experts class of the MoE layers and its extra arguments; None keeps megatron's
    SequentialMLP. Plain MoE with grouped GEMMs is the MoNE module at rho = 1 (the same
    function as SequentialMLP, tested), without the neuron-level loss."""
    mone = cfg.moe.flavour == "mone"
    grouped = cfg.moe.grouped_on("cuda" if on_cuda() else "cpu")
    if not mone and not grouped:
        return None
    module = GroupedMoNEExperts if grouped else MoNEExperts
    return module, {
        "neuron_keep_ratio": cfg.moe.neuron_keep_ratio if mone else 1.0,
        "ng_lbl_coeff": cfg.moe.ng_lbl_coeff if cfg.moe.ng_lbl_on() else 0.0,
        "num_moe_layers": num_moe_layers(cfg),
        "kernel_impl": cfg.moe.kernel_impl,
        "neuron_bias_update_rate": (
            cfg.moe.neuron_bias_update_rate if cfg.moe.neuron_bias_on() else None
        ),
    }


def _shared_experts_module(cfg: Config) -> tuple[type, dict] | None:
    """The MoNE shared experts and their arguments; None keeps megatron's SharedExpertMLP."""
    if not (cfg.moe.shared_expert_mone and cfg.model.shared_expert_ffn_hidden_size):
        return None
    return MoNESharedExperts, {
        "neuron_keep_ratio": cfg.moe.neuron_keep_ratio,
        "kernel_impl": cfg.moe.kernel_impl,
    }


class _Swaps(NamedTuple):
    """What :func:`_swap_layer_spec` plugs into megatron's layer spec (None: keep megatron's)."""

    sdpa: bool
    experts: tuple[type, dict] | None
    shared_experts: tuple[type, dict] | None
    fused_norm: bool
    qk_norm: str

    def changes_nothing(self) -> bool:
        return not (self.sdpa or self.experts or self.shared_experts or self.fused_norm) and (
            self.qk_norm not in ("full", "latent")
        )


def _swap_layer_spec(spec: ModuleSpec, swaps: _Swaps) -> ModuleSpec:
    """A copy of megatron's layer spec with our core attention, experts and norms plugged in."""
    new_spec = copy.deepcopy(spec)
    attention = new_spec.submodules.self_attention.submodules
    if swaps.sdpa:
        assert attention.core_attention is DotProductAttention, attention.core_attention
        attention.core_attention = SDPAttention
    if swaps.qk_norm == "latent":
        # MLA's latent down-projections whole on every tensor-parallel rank (megatron's
        # "duplicated" mode, as with TransformerEngine). megatron 0.16.1's column-split path
        # gathers the key/value latent and hands every rank the shared RoPE key whole, but
        # gives it back only the rank's own heads' gradient: its weight rows and the layer's
        # input gradient come out wrong at TP > 1. Replicated, the RoPE key is gathered from
        # the sequence-parallel region, whose backward sums every rank's part.
        attention.linear_q_down_proj = attention.linear_kv_down_proj = ReplicatedLinear
    if swaps.qk_norm == "full":
        attention.q_layernorm, attention.k_layernorm = FullWidthQueryNorm, FullWidthKeyNorm
    elif swaps.qk_norm in ("head", "latent") and swaps.fused_norm:
        kv = "kv_layernorm" if swaps.qk_norm == "latent" else "k_layernorm"  # MLA: latent norms
        for name in ("q_layernorm", kv):
            if getattr(attention, name) is WrappedTorchNorm:
                setattr(attention, name, RMSNorm)
    mlp = new_spec.submodules.mlp
    if swaps.experts is not None and mlp.module is MoELayer:
        experts_spec = mlp.submodules.experts
        assert experts_spec.module is SequentialMLP, experts_spec.module
        experts_spec.module, experts_spec.params = swaps.experts
    if swaps.shared_experts is not None and mlp.module is MoELayer:
        shared_spec = mlp.submodules.shared_experts
        assert shared_spec.module is SharedExpertMLP, shared_spec.module
        shared_spec.module, shared_spec.params = swaps.shared_experts
    if swaps.fused_norm:
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(new_spec.submodules, name) is WrappedTorchNorm:
                setattr(new_spec.submodules, name, RMSNorm)
    return new_spec


def decoder_block_spec(cfg: Config, config: TransformerConfig) -> TransformerBlockSubmodules:
    """megatron-core's local decoder block spec with the core attention chosen by
    ``cfg.model.attention``, the norms by ``cfg.model.norm`` and the experts by ``cfg.moe``."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization="RMSNorm"
    )
    swaps = _Swaps(
        sdpa=cfg.model.attention == "sdpa",
        experts=_experts_module(cfg),
        shared_experts=_shared_experts_module(cfg),
        fused_norm=cfg.model.norm == "fused",
        qk_norm="latent" if cfg.model.multi_latent_attention else cfg.model.qk_layernorm,
    )
    if swaps.changes_nothing():
        return block
    swapped: dict[int, ModuleSpec] = {}  # layers share spec objects; copy each one once
    layer_specs = []
    for spec in block.layer_specs:
        if id(spec) not in swapped:
            swapped[id(spec)] = _swap_layer_spec(spec, swaps)
        layer_specs.append(swapped[id(spec)])
    final_norm = block.layer_norm
    if swaps.fused_norm and final_norm is WrappedTorchNorm:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)


def mtp_block_spec(
    cfg: Config, config: TransformerConfig, block: TransformerBlockSubmodules
) -> ModuleSpec | None:
    """megatron-core's multi-token prediction block (``model.mtp_num_layers``) for this rank:
    its layers are the decoder's last layer spec (our attention core, norms and experts
    included) and, with ``model.norm=fused``, our RMSNorm as their three norms; built on the
    last pipeline stage only; None elsewhere and without MTP."""
    if not cfg.model.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine=False)
    if spec is not None and cfg.model.norm == "fused":
        for layer in {id(s): s for s in spec.layer_specs}.values():  # one spec, shared
            for name in ("enorm", "hnorm", "layer_norm"):
                if getattr(layer.submodules, name) is WrappedTorchNorm:
                    setattr(layer.submodules, name, RMSNorm)
    return spec


def build_gpt_model(cfg: Config, vocab_size: int, meta: bool = False) -> GPTModel:
    """The GPTModel on this rank: its pipeline stage's layers (the embedding on the first stage,
    the output layer on the last), its tensor-parallel slices and its local experts. Seed torch
    before calling. ``meta``: every tensor on the meta device, nothing allocated or initialised
    (the names, shapes and sharding that import and export read and write)."""
    config = transformer_config(cfg)
    if meta:  # megatron allocates on the GPU unless asked for "CPU" (here: meta) tensors
        config.use_cpu_initialization, config.perform_initialization = True, False
    block = decoder_block_spec(cfg, config)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            mtp_block_spec=mtp_block_spec(cfg, config, block),
            vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            **position_embedding_kwargs(cfg.model),
        )
    if cfg.model.rope_scaling.rope_type == "llama3":
        set_llama3_frequencies(model.rotary_pos_emb, cfg.model)
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        if isinstance(module.experts, MoNEExperts):
            module.experts.layer_number = module.layer_number
        # Expert weights are reduced over the expert data-parallel group, whatever EP is.
        # megatron marks them so only at EP > 1; at EP = 1 with TP > 1 its DDP would reduce
        # them over the (smaller) attention data-parallel group, leaving out the other
        # tensor-parallel ranks, whose sequence-parallel positions the experts also saw.
        for param in module.experts.parameters():
            param.allreduce = False
    return model


def to_bf16_with_masters(model: GPTModel) -> None:
    """Megatron's bf16 mode: weights (and so compute and activations) in bf16, each weight's
    fp32 value kept as ``param.main_param`` for the optimizer (mone_train/components/optimizer.py).

    What stays fp32 inside: the router (``moe_router_dtype``), the MoNE selection statistic and
    NG-LBL (computed in fp32 by the experts), the loss (logits upcast), and, through DDP's
    ``grad_reduce_in_fp32``, the gradient buffers and their all-reduce.
    """
    for param in model.parameters():
        param.main_param = param.detach().clone()  # exact fp32 master (a leaf, no grad)
    model.bfloat16()  # same Parameter objects, bf16 data: main_param stays attached
    model.config.bf16 = True  # one config object is shared by every module
    model.config.params_dtype = torch.bfloat16


def build_model(
    cfg: Config,
    vocab_size: int,
    ep_rank: int = 0,
    ep_size: int = 1,
    load_weights: Callable[[GPTModel], None] | None = None,
) -> tuple[DistributedDataParallel, list[torch.nn.Parameter]]:
    """The seeded, initialised model of this rank wrapped in megatron-core DDP, and its
    trainable parameters.

    The same seed on every rank drives dropout streams and megatron's own draws; weights are
    then set by global parameter name (each tensor-parallel rank keeping its slice), so they
    do not depend on the TP, PP or EP layout. ``load_weights`` (``trainer.init_from``) then
    replaces them, in fp32, before a bf16 cast.
    """
    torch.manual_seed(cfg.trainer.seed)
    model_parallel_cuda_manual_seed(cfg.trainer.seed)
    model = build_gpt_model(cfg, vocab_size)
    init_parameters_by_name(
        model,
        cfg.trainer.seed,
        cfg.model.init_method_std,
        cfg.model.num_layers,
        ep_rank,
        cfg.model.num_experts // ep_size,
        layout=TensorLayout.current(),
    )
    if load_weights is not None:
        load_weights(model)
    if cfg.trainer.precision == "bf16":
        to_bf16_with_masters(model)
    if on_cuda():
        model.cuda(torch.cuda.current_device())
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    return ddp, [p for p in ddp.parameters() if p.requires_grad]
