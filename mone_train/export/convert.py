"""megatron-core GPTModel weights -> a Hugging Face model's weights and config.

Two target architectures, chosen by :func:`architecture_for`:

- ``mixtral`` (transformers' own ``MixtralForCausalLM``, no remote code) when every layer is a MoE
  layer and every neuron is kept (plain MoE, or MoNE at rho = 1). Its forward is megatron's:
  RMSNorm, rotate-half RoPE, grouped-query attention without biases, router softmax over all
  experts -> top-k -> renormalised over the k (= megatron's top-k over logits -> softmax over the
  k), SwiGLU experts with fc1 = [gate | up]. The export test checks the logits to 1e-4.
- ``mone`` (our ``modeling_mone.py``) otherwise: MoNE models (K < F), and models with dense
  layers (``moe_layer_freq`` > 1), which Mixtral cannot express.

Legend: H query heads, G query groups (key/value heads), Dh head size, D hidden size, E experts,
F neurons per expert.
"""

from __future__ import annotations

import re

import torch

from mone_kernels.rules import num_kept_neurons
from mone_train.config import Config
from mone_train.export.errors import ExportError

ARCHITECTURES = ("mixtral", "mone")
ROPE_BASE = 10000.0  # megatron-core GPTModel's rotary_base default; builder.py does not change it
RMS_NORM_EPS = 1e-5  # megatron-core TransformerConfig.layernorm_epsilon default, as builder.py uses

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")


def num_kept(cfg: Config) -> int:
    """K of the trained model: round(rho * F) for MoNE, F for plain MoE."""
    num_neurons = cfg.model.moe_ffn_hidden_size
    if cfg.moe.flavour != "mone":
        return num_neurons
    return num_kept_neurons(cfg.moe.neuron_keep_ratio, num_neurons)


def architecture_for(cfg: Config) -> str:
    """``mixtral`` when transformers' Mixtral reproduces the model exactly, else ``mone``."""
    keeps_all = num_kept(cfg) == cfg.model.moe_ffn_hidden_size
    return "mixtral" if keeps_all and cfg.model.moe_layer_freq == 1 else "mone"


def is_moe_layer(cfg: Config, layer: int) -> bool:
    """megatron's rule for an integer ``moe_layer_freq``: layers 0, f, 2f, ... are MoE."""
    return layer % cfg.model.moe_layer_freq == 0


def split_qkv(
    qkv_weight: torch.Tensor, num_heads: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused ``linear_qkv`` weight -> (q [H*Dh, D], k [G*Dh, D], v [G*Dh, D]).

    megatron interleaves by query group: for each group g its H/G query heads, then its key
    head, then its value head, each Dh rows. Query head h belongs to group h // (H/G), the
    grouping transformers' ``repeat_kv`` assumes.
    """
    heads_per_group = num_heads // num_groups
    rows, hidden = qkv_weight.shape
    head_dim = rows // (num_groups * (heads_per_group + 2))
    w = qkv_weight.view(num_groups, heads_per_group + 2, head_dim, hidden)
    q = w[:, :heads_per_group].reshape(num_heads * head_dim, hidden)
    k = w[:, heads_per_group].reshape(num_groups * head_dim, hidden)
    v = w[:, heads_per_group + 1].reshape(num_groups * head_dim, hidden)
    return q.clone(), k.clone(), v.clone()


def _layer_tensors(cfg: Config, state: dict[str, torch.Tensor]) -> dict[int, dict[str, object]]:
    """Group megatron's per-layer weights: {layer: {name: tensor, "experts": {e: {fc: w}}}}."""
    layers: dict[int, dict[str, object]] = {}
    for key, tensor in state.items():
        match = _LAYER.fullmatch(key)
        if match is None:
            continue
        layer, rest = int(match.group(1)), match.group(2)
        entry = layers.setdefault(layer, {"experts": {}})
        expert = _EXPERT.fullmatch(rest)
        if expert is not None:
            entry["experts"].setdefault(int(expert.group(1)), {})[expert.group(2)] = tensor
        else:
            entry[rest] = tensor
    if sorted(layers) != list(range(cfg.model.num_layers)):
        raise ExportError(
            f"the checkpoint holds decoder layers {sorted(layers)}, expected "
            f"{cfg.model.num_layers} (0 ... {cfg.model.num_layers - 1})"
        )
    return layers


def _take(entry: dict, name: str, layer: int) -> torch.Tensor:
    try:
        return entry.pop(name)
    except KeyError:
        raise ExportError(f"decoder layer {layer} lacks megatron weight {name!r}") from None


def _experts(entry: dict, cfg: Config, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([E, 2F, D] stacked fc1, [E, D, F] stacked fc2) of one MoE layer."""
    experts = entry.pop("experts")
    if sorted(experts) != list(range(cfg.model.num_experts)):
        raise ExportError(
            f"decoder layer {layer} holds experts {sorted(experts)}, expected "
            f"{cfg.model.num_experts} (was the checkpoint loaded at expert-parallel size 1?)"
        )
    fc1 = torch.stack([experts[e]["linear_fc1"] for e in range(cfg.model.num_experts)])
    fc2 = torch.stack([experts[e]["linear_fc2"] for e in range(cfg.model.num_experts)])
    return fc1, fc2


def _convert_layer(cfg: Config, entry: dict, layer: int, arch: str) -> dict[str, torch.Tensor]:
    """One decoder layer's weights under Hugging Face names (relative to ``model.layers.i.``)."""
    num_heads = cfg.model.num_attention_heads
    num_groups = cfg.model.num_query_groups or num_heads
    q, k, v = split_qkv(
        _take(entry, "self_attention.linear_qkv.weight", layer), num_heads, num_groups
    )
    out = {
        "input_layernorm.weight": _take(entry, "input_layernorm.weight", layer),
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": _take(entry, "self_attention.linear_proj.weight", layer),
        "post_attention_layernorm.weight": _take(entry, "pre_mlp_layernorm.weight", layer),
    }
    if is_moe_layer(cfg, layer):
        fc1, fc2 = _experts(entry, cfg, layer)
        router = _take(entry, "mlp.router.weight", layer)
        if arch == "mixtral":
            out.update({"mlp.gate.weight": router, "mlp.experts.gate_up_proj": fc1})
            out["mlp.experts.down_proj"] = fc2
        else:
            out.update({"mlp.router.weight": router, "mlp.experts.gate_up_proj": fc1})
            out["mlp.experts.down_proj_t"] = fc2.transpose(1, 2).contiguous()
    else:
        entry.pop("experts")
        out["mlp.gate_up_proj.weight"] = _take(entry, "mlp.linear_fc1.weight", layer)
        out["mlp.down_proj.weight"] = _take(entry, "mlp.linear_fc2.weight", layer)
    leftover = [name for name in entry if not name.endswith("_extra_state")]
    if leftover:
        raise ExportError(f"decoder layer {layer}: megatron weight {leftover[0]!r} has no mapping")
    return {f"model.layers.{layer}.{name}": tensor for name, tensor in out.items()}


def convert_state_dict(
    cfg: Config, state: dict[str, torch.Tensor], arch: str
) -> dict[str, torch.Tensor]:
    """megatron GPTModel ``state_dict()`` (all experts, EP = 1) -> Hugging Face state dict."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not one of {ARCHITECTURES}")
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": state.pop("embedding.word_embeddings.weight")}
    out["model.norm.weight"] = state.pop("decoder.final_layernorm.weight")
    output_layer = state.pop("output_layer.weight", None)
    if not cfg.model.tie_embeddings:
        if output_layer is None:
            raise ExportError("the checkpoint lacks output_layer.weight (an untied model)")
        out["lm_head.weight"] = output_layer
    for layer, entry in sorted(_layer_tensors(cfg, state).items()):
        out.update(_convert_layer(cfg, entry, layer, arch))
    unmapped = [k for k in state if not _LAYER.fullmatch(k)]
    if unmapped:
        raise ExportError(f"megatron weight {unmapped[0]!r} has no mapping")
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def hf_config_kwargs(cfg: Config, vocab_size: int, special: dict[str, int | None]) -> dict:
    """Keyword arguments shared by both architectures' configs."""
    m = cfg.model
    return {
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": RMS_NORM_EPS,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": m.tie_embeddings,
        "num_experts_per_tok": m.router_topk,
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "bos_token_id": special.get("bos"),
    }


def hf_config(cfg: Config, vocab_size: int, special: dict[str, int | None], arch: str):
    """The transformers config object of the export (``MixtralConfig`` or ``MoNEConfig``)."""
    common = hf_config_kwargs(cfg, vocab_size, special)
    m = cfg.model
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            **common,
            intermediate_size=m.moe_ffn_hidden_size,
            num_local_experts=m.num_experts,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
            sliding_window=None,
            router_jitter_noise=0.0,
            router_aux_loss_coef=m.aux_loss_coeff,
        )
    from mone_train.export.remote_code.configuration_mone import MoNEConfig

    return MoNEConfig(
        **common,
        intermediate_size=m.ffn_hidden_size,
        moe_intermediate_size=m.moe_ffn_hidden_size,
        num_experts=m.num_experts,
        moe_layer_freq=m.moe_layer_freq,
        neuron_keep_ratio=float(cfg.moe.neuron_keep_ratio if cfg.moe.flavour == "mone" else 1.0),
        num_kept_neurons=num_kept(cfg),
        rope_theta=ROPE_BASE,
    )
