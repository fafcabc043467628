"""megatron-core GPTModel weights <-> a Hugging Face model's weights and config.

Two kinds of target, chosen by :func:`architecture_for`:

- the family's own transformers class (``MixtralForCausalLM``, ``OlmoeForCausalLM``,
  ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``; no remote code) when that class computes
  exactly what was trained: every neuron kept (plain MoE, or MoNE at rho = 1) and nothing the
  class lacks (``mone_train/families/<family>``, ``Family.native_mismatch``);
- ``mone`` (our ``modeling_mone.py``) otherwise: MoNE models (K < F), the neuron-level balance
  bias, ``arch=deepseek`` (grouped-query attention; transformers' DeepSeek-V3 class has latent
  attention only), ``arch=deepseek_v3`` MoNE (latent attention with MoNE experts), and any
  recipe option a family's class cannot express.

Both sides share one layout of each layer's tensors; :func:`megatron_layer` reads megatron's
names into it and :func:`hf_layer_names` names it for the target (``mone_train/importer``
reads it backwards). Multi-head latent attention keeps transformers' DeepSeek-V3 projections
one to one (:data:`MLA_NAMES`, the names and rows our modeling code reads too); megatron's
multi-token prediction layers become DeepSeek-V3's extra layers after the decoder's
(:data:`MTP_NAMES`, only when asked: transformers' class does not read them; our modeling code
has none). The export test checks the logits against megatron's to 1e-4.

Legend: H query heads, G query groups (key/value heads), Dh head size, D hidden size, E experts,
F neurons per expert, S shared expert width, I dense MLP width.
"""

from __future__ import annotations

import re

import torch

from mone_kernels.rules import num_kept_neurons
from mone_train.config import Config
from mone_train.export.errors import ExportError
from mone_train.families import family_names, load_family

MONE = "mone"

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")

# One decoder layer's tensors by neutral name -> megatron's name (``decoder.layers.i.`` + it).
# Experts are stacked ([E, 2F, D] fc1, [E, D, F] fc2) from megatron's per-expert weights.
MEGATRON_NAMES = {
    "input_norm": "input_layernorm.weight",
    "qkv": "self_attention.linear_qkv.weight",
    "qkv_bias": "self_attention.linear_qkv.bias",
    "q_norm": "self_attention.q_layernorm.weight",
    "k_norm": "self_attention.k_layernorm.weight",
    "o": "self_attention.linear_proj.weight",
    "mlp_norm": "pre_mlp_layernorm.weight",
    "router": "mlp.router.weight",
    "expert_bias": "mlp.router.expert_bias",
    "neuron_bias": "mlp.experts.neuron_bias",
    "shared_fc1": "mlp.shared_experts.linear_fc1.weight",
    "shared_fc2": "mlp.shared_experts.linear_fc2.weight",
    "shared_gate": "mlp.shared_experts.gate_weight",
    "dense_fc1": "mlp.linear_fc1.weight",
    "dense_fc2": "mlp.linear_fc2.weight",
}
# transformers' DeepseekV3Attention module -> megatron's MLASelfAttention module (the same rows:
# queries and keys per head [no RoPE | RoPE], the key/value latent then the shared RoPE key,
# keys and values per head [key | value]); q_a_* without a query latent, q_proj with none
MLA_NAMES = {
    "q_a_proj": "linear_q_down_proj",
    "q_a_layernorm": "q_layernorm",
    "q_b_proj": "linear_q_up_proj",
    "q_proj": "linear_q_proj",
    "kv_a_proj_with_mqa": "linear_kv_down_proj",
    "kv_a_layernorm": "kv_layernorm",
    "kv_b_proj": "linear_kv_up_proj",
    "o_proj": "linear_proj",
}
# the same under the neutral names of an MLA layer (its output projection and query-latent norm
# take megatron's names of grouped-query attention's)
MLA_MEGATRON_NAMES = {
    f"mla.{theirs}": f"self_attention.{ours}.weight" for theirs, ours in MLA_NAMES.items()
}
# DeepSeek-V3's multi-token prediction layer (``model.layers.<num_hidden_layers + j>.``) ->
# megatron's MTP layer ``mtp.layers.<j>.`` besides its ``transformer_layer``: the norms of the
# embedding and of the decoder's hidden state, their joint projection, and the final norm
MTP_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "final_layernorm.weight",
}


def num_kept(cfg: Config) -> int:
    """K of the trained model: round(rho * F) for MoNE, F for plain MoE."""
    num_neurons = cfg.model.moe_ffn_hidden_size
    if cfg.moe.flavour != "mone":
        return num_neurons
    return num_kept_neurons(cfg.moe.neuron_keep_ratio, num_neurons)


def architecture_for(cfg: Config) -> str:
    """The family's name when its transformers class reproduces the model exactly, else
    ``mone`` (our modeling code, grouped-query or multi-head latent attention)."""
    return MONE if native_mismatch(cfg) else cfg.model.family


def native_mismatch(cfg: Config) -> str | None:
    """Why the model cannot be its family's transformers class (None when it can)."""
    return load_family(cfg.model.family).native_mismatch(cfg)


def architectures() -> tuple[str, ...]:
    """Every export target: the families with a transformers class, and ``mone``."""
    native = tuple(name for name in family_names() if load_family(name).hf_class)
    return (*native, MONE)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused ``linear_qkv`` weight [rows, D] (or bias [rows]) -> (q, k, v).

    megatron interleaves by query group: for each group g its H/G query heads, then its key
    head, then its value head, each Dh rows. Query head h belongs to group h // (H/G), the
    grouping transformers' ``repeat_kv`` assumes.
    """
    heads_per_group = num_heads // num_groups
    head_dim = qkv.shape[0] // (num_groups * (heads_per_group + 2))
    w = qkv.reshape(num_groups, heads_per_group + 2, head_dim, *qkv.shape[1:])
    q = w[:, :heads_per_group].reshape(num_heads * head_dim, *qkv.shape[1:])
    k = w[:, heads_per_group].reshape(num_groups * head_dim, *qkv.shape[1:])
    v = w[:, heads_per_group + 1].reshape(num_groups * head_dim, *qkv.shape[1:])
    return q.clone(), k.clone(), v.clone()


def join_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """The inverse of :func:`split_qkv`: separate q, k, v -> megatron's fused layout."""
    heads_per_group = num_heads // num_groups
    head_dim = k.shape[0] // num_groups
    rest = q.shape[1:]
    parts = (
        q.reshape(num_groups, heads_per_group, head_dim, *rest),
        k.reshape(num_groups, 1, head_dim, *rest),
        v.reshape(num_groups, 1, head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest).clone()


def is_moe_layer(cfg: Config, layer: int) -> bool:
    """Whether decoder layer ``layer`` is MoE; layers past the decoder's are the multi-token
    prediction layers, built like the last decoder layer."""
    pattern = cfg.model.moe_layer_pattern()
    return bool(pattern[min(layer, len(pattern) - 1)])


def megatron_layer(cfg: Config, entry: dict, layer: int) -> dict[str, torch.Tensor]:
    """One decoder layer's megatron tensors (``entry``: its keys without the layer prefix,
    per-expert weights under ``entry['experts']``) -> the neutral layout (what it has)."""
    out: dict[str, torch.Tensor] = {}
    experts = entry.pop("experts")
    mla = cfg.model.multi_latent_attention
    names = {**MLA_MEGATRON_NAMES, **MEGATRON_NAMES} if mla else MEGATRON_NAMES
    for name, key in names.items():
        if key in entry:
            out[name] = entry.pop(key)
    for name in MTP_NAMES.values():
        if f"mtp.{name}" in entry:
            out[f"mtp.{name}"] = entry.pop(f"mtp.{name}")
    attention = ("mla.kv_b_proj", "mla.o_proj") if mla else ("qkv", "o")
    for name in (*attention, "input_norm", "mlp_norm"):
        if name not in out:
            raise ExportError(f"decoder layer {layer} lacks megatron weight {names[name]!r}")
    if is_moe_layer(cfg, layer):
        if "router" not in out:
            raise ExportError(f"MoE layer {layer} lacks megatron weight 'mlp.router.weight'")
        if sorted(experts) != list(range(cfg.model.num_experts)):
            raise ExportError(
                f"decoder layer {layer} holds experts {sorted(experts)}, expected "
                f"{cfg.model.num_experts} (was the checkpoint loaded at expert-parallel size 1?)"
            )
        out["experts_fc1"] = torch.stack([experts[e]["linear_fc1"] for e in sorted(experts)])
        out["experts_fc2"] = torch.stack([experts[e]["linear_fc2"] for e in sorted(experts)])
    elif "dense_fc1" not in out:
        raise ExportError(f"dense layer {layer} lacks megatron weight 'mlp.linear_fc1.weight'")
    leftover = [name for name in entry if not name.endswith("_extra_state")]
    if leftover:
        raise ExportError(f"decoder layer {layer}: megatron weight {leftover[0]!r} has no mapping")
    return out


def _attention_names(cfg: Config, t: dict, out: dict) -> None:
    m = cfg.model
    out["input_layernorm.weight"] = t["input_norm"]
    out["post_attention_layernorm.weight"] = t["mlp_norm"]
    if m.multi_latent_attention:
        for theirs in MLA_NAMES:
            if f"mla.{theirs}" in t:
                out[f"self_attn.{theirs}.weight"] = t[f"mla.{theirs}"]
        return
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    q, k, v = split_qkv(t["qkv"], heads, groups)
    out.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k})
    out.update({"self_attn.v_proj.weight": v, "self_attn.o_proj.weight": t["o"]})
    if "qkv_bias" in t:
        qb, kb, vb = split_qkv(t["qkv_bias"], heads, groups)
        out.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb})
        out["self_attn.v_proj.bias"] = vb
    if "q_norm" in t:
        out["self_attn.q_norm.weight"] = t["q_norm"]
        out["self_attn.k_norm.weight"] = t["k_norm"]


def _swiglu_names(prefix: str, fc1: torch.Tensor, fc2: torch.Tensor, fused: bool) -> dict:
    """A SwiGLU MLP's weights: ours fuse [gate | up]; transformers' classes keep them apart."""
    if fused:
        return {f"{prefix}gate_up_proj.weight": fc1, f"{prefix}down_proj.weight": fc2}
    gate, up = fc1.chunk(2, dim=0)
    return {
        f"{prefix}gate_proj.weight": gate.clone(),
        f"{prefix}up_proj.weight": up.clone(),
        f"{prefix}down_proj.weight": fc2,
    }


def hf_layer_names(cfg: Config, t: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The neutral layer layout -> Hugging Face names (relative to ``model.layers.i.``)."""
    ours = arch == MONE
    out: dict[str, torch.Tensor] = {}
    _attention_names(cfg, t, out)
    for theirs, name in MTP_NAMES.items():  # a multi-token prediction layer's own
        if f"mtp.{name}" in t:
            out[theirs] = t[f"mtp.{name}"]
    if "experts_fc1" not in t:
        out.update(_swiglu_names("mlp.", t["dense_fc1"], t["dense_fc2"], fused=ours))
        return out
    out["mlp.experts.gate_up_proj"] = t["experts_fc1"]
    if ours:
        out["mlp.router.weight"] = t["router"]
        out["mlp.experts.down_proj_t"] = t["experts_fc2"].transpose(1, 2).contiguous()
        for name, hf in (("expert_bias", "mlp.router.expert_bias"),
                         ("neuron_bias", "mlp.experts.neuron_bias")):  # fmt: skip
            if name in t:
                out[hf] = t[name]
        shared = "mlp.shared_expert."
    else:
        family = load_family(arch)
        out["mlp.gate.weight"] = t["router"]
        out["mlp.experts.down_proj"] = t["experts_fc2"]
        if "expert_bias" in t:
            out[f"mlp.{family.hf_expert_bias}"] = t["expert_bias"]
        shared = f"mlp.{family.hf_shared_expert}"
    if "shared_fc1" in t:
        out.update(_swiglu_names(shared, t["shared_fc1"], t["shared_fc2"], ours))
        if "shared_gate" in t:
            out["mlp.shared_expert_gate.weight"] = t["shared_gate"]
    return out


def _layer_entries(
    cfg: Config, state: dict[str, torch.Tensor], complete: bool = True
) -> dict[int, dict[str, object]]:
    """Group megatron's per-layer weights: {layer: {name: tensor, "experts": {e: {fc: w}}}};
    ``complete``: every decoder layer must be there."""
    layers: dict[int, dict[str, object]] = {}
    for key, tensor in state.items():
        match = _LAYER.fullmatch(key)
        if match is not None:
            layer, rest = int(match.group(1)), match.group(2)
        elif (match := _MTP_LAYER.fullmatch(key)) is not None:
            layer, rest = cfg.model.num_layers + int(match.group(1)), match.group(2)
            if not rest.startswith("transformer_layer."):
                rest = f"mtp.{rest}"  # its own norms and projection
            rest = rest.removeprefix("transformer_layer.")
        else:
            continue
        entry = layers.setdefault(layer, {"experts": {}})
        expert = _EXPERT.fullmatch(rest)
        if expert is not None:
            entry["experts"].setdefault(int(expert.group(1)), {})[expert.group(2)] = tensor
        else:
            entry[rest] = tensor
    if complete and sorted(layers)[: cfg.model.num_layers] != list(range(cfg.model.num_layers)):
        raise ExportError(
            f"the checkpoint holds decoder layers {sorted(layers)}, expected "
            f"{cfg.model.num_layers} (0 ... {cfg.model.num_layers - 1})"
        )
    return layers


def convert_state_dict(
    cfg: Config, state: dict[str, torch.Tensor], arch: str
) -> dict[str, torch.Tensor]:
    """megatron GPTModel ``state_dict()`` (all experts, EP = 1) -> Hugging Face state dict."""
    if arch not in architectures():
        raise ValueError(f"architecture {arch!r} is not one of {architectures()}")
    # transformers' classes hold no multi-token prediction layers (the export writes them only
    # when asked, convert_partial)
    state = {
        k: v for k, v in state.items()
        if not k.endswith("_extra_state") and not _MTP_LAYER.fullmatch(k)
    }  # fmt: skip
    out = {"model.embed_tokens.weight": state.pop("embedding.word_embeddings.weight")}
    out["model.norm.weight"] = state.pop("decoder.final_layernorm.weight")
    output_layer = state.pop("output_layer.weight", None)
    if not cfg.model.tie_embeddings:
        if output_layer is None:
            raise ExportError("the checkpoint lacks output_layer.weight (an untied model)")
        out["lm_head.weight"] = output_layer
    for layer, entry in sorted(_layer_entries(cfg, state).items()):
        names = hf_layer_names(cfg, megatron_layer(cfg, entry, layer), arch)
        out.update({f"model.layers.{layer}.{name}": tensor for name, tensor in names.items()})
    unmapped = [k for k in state if not _LAYER.fullmatch(k)]
    if unmapped:
        raise ExportError(f"megatron weight {unmapped[0]!r} has no mapping")
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# megatron's names of the tensors outside the decoder layers -> Hugging Face's
OUTER_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def convert_partial(
    cfg: Config, state: dict[str, torch.Tensor], arch: str
) -> dict[str, torch.Tensor]:
    """Some of the model's megatron tensors (the outer ones, or whole decoder layers: what a
    streaming export reads at a time; meta tensors too) -> their Hugging Face tensors, named
    and laid out as :func:`convert_state_dict` does. A multi-token prediction layer's group
    also holds the embedding and output layer: DeepSeek-V3's layout keeps a copy of each in
    the layer (``embed_tokens``, ``shared_head.head``)."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    mtp = sorted({int(match.group(1)) for k in state if (match := _MTP_LAYER.fullmatch(k))})
    outer = OUTER_NAMES
    if mtp:
        layer = f"model.layers.{cfg.model.num_layers + mtp[0]}."
        outer = {"embedding.word_embeddings.weight": f"{layer}embed_tokens.weight",
                 "output_layer.weight": f"{layer}shared_head.head.weight"}  # fmt: skip
    out = {}
    for ours, theirs in outer.items():
        tensor = state.pop(ours, None)
        if tensor is not None and not (ours == "output_layer.weight" and cfg.model.tie_embeddings):
            out[theirs] = tensor
    if mtp and cfg.model.tie_embeddings:
        out[outer["output_layer.weight"]] = out[outer["embedding.word_embeddings.weight"]]
    for layer, entry in sorted(_layer_entries(cfg, state, complete=False).items()):
        names = hf_layer_names(cfg, megatron_layer(cfg, entry, layer), arch)
        out.update({f"model.layers.{layer}.{name}": tensor for name, tensor in names.items()})
    unmapped = [k for k in state if not (_LAYER.fullmatch(k) or _MTP_LAYER.fullmatch(k))]
    if unmapped:
        raise ExportError(f"megatron weight {unmapped[0]!r} has no mapping")
    return out


def hf_config_kwargs(cfg: Config, vocab_size: int, special: dict[str, int | None]) -> dict:
    """Keyword arguments shared by every target's config."""
    m = cfg.model
    return {
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.attention_head_dim(),
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": m.tie_embeddings,
        "num_experts_per_tok": m.router_topk,
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "bos_token_id": special.get("bos"),
    }


def hf_config(cfg: Config, vocab_size: int, special: dict[str, int | None], arch: str):
    """The transformers config object of the export (the family's class's, or ``MoNEConfig``)."""
    common = hf_config_kwargs(cfg, vocab_size, special)
    m = cfg.model
    rope = m.rope_scaling.hf_parameters(m.rotary_base, m.max_position_embeddings)
    if arch != MONE:
        import transformers

        family = load_family(arch)
        config_class = getattr(transformers, family.hf_class.replace("ForCausalLM", "Config"))
        # the family's own fields win (DeepSeek-V3's head_dim is its RoPE part's)
        return config_class(**{**common, **family.hf_config_kwargs(cfg)}, rope_parameters=rope)
    from mone_train.export.remote_code.configuration_mone import MoNEConfig

    common.update(_latent_attention_kwargs(cfg))  # head_dim: the RoPE part's under MLA
    shared_kept = None
    if m.shared_expert_ffn_hidden_size and cfg.moe.shared_expert_mone:
        shared_kept = num_kept_neurons(cfg.moe.neuron_keep_ratio, m.shared_expert_ffn_hidden_size)
    return MoNEConfig(
        **common,
        intermediate_size=m.ffn_hidden_size,
        moe_intermediate_size=m.moe_ffn_hidden_size,
        num_experts=m.num_experts,
        moe_layer_pattern=m.moe_layer_pattern(),
        neuron_keep_ratio=float(cfg.moe.neuron_keep_ratio if cfg.moe.flavour == "mone" else 1.0),
        num_kept_neurons=num_kept(cfg),
        shared_expert_intermediate_size=m.shared_expert_ffn_hidden_size,
        shared_expert_gate=m.shared_expert_gate,
        shared_expert_num_kept=shared_kept,
        router_score=m.router_score,
        router_pre_softmax=m.router_pre_softmax,
        router_topk_scaling=m.router_topk_scaling,
        router_num_groups=m.router_num_groups,
        router_group_topk=m.router_group_topk,
        router_expert_bias=m.router_expert_bias,
        neuron_bias=cfg.moe.neuron_bias_on() and num_kept(cfg) < m.moe_ffn_hidden_size,
        qk_layernorm=m.qk_layernorm,
        qkv_bias=m.qkv_bias,
        rope_theta=m.rotary_base,
        rope_parameters=rope,
    )


def _latent_attention_kwargs(cfg: Config) -> dict:
    """MoNEConfig's multi-head latent attention fields ({} for grouped-query attention);
    head_dim is the RoPE part's, as in DeepSeek-V3's config."""
    m = cfg.model
    if not m.multi_latent_attention:
        return {}
    return {
        "multi_latent_attention": True,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_head_dim,
        "qk_rope_head_dim": m.qk_pos_emb_head_dim,
        "v_head_dim": m.v_head_dim,
        "head_dim": m.qk_pos_emb_head_dim,
    }
