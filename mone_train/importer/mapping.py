"""A Hugging Face model -> our model settings and megatron-core's tensors (export's inverse).

Settings: the shape and recipe every transformers MoE class shares (read here) plus what the
family's folder translates (``Family.model_overrides``). Tensors: the names of
``mone_train/export/convert.py`` read backwards (fused ``linear_qkv`` joined per query group,
fc1 = [gate | up], experts stacked per layer). Whatever our model cannot reproduce exactly
(a RoPE other than plain, Llama 3's or YaRN, a sliding window, biases on the output projection,
latent attention) is refused with one line naming it.
"""

from __future__ import annotations

import dataclasses

import torch

from mone_train.config import ROPE_PARAMETER_KEYS, ModelConfig
from mone_train.export.convert import join_qkv
from mone_train.families import family_names, load_family
from mone_train.importer.hf_source import HFSource, ImportError_

# Dense models import upcycled, into the family whose attention matches theirs.
DENSE = {
    "llama": ("mixtral", {}),
    "qwen2": ("mixtral", {"qkv_bias": True}),
    "qwen3": ("qwen3_moe", {"qk_layernorm": "head"}),
}
NOT_SUPPORTED = {
    "deepseek_v2": "importing multi-head latent attention (DeepSeek-V2/V3) is not supported yet "
    "(arch=deepseek_v3 trains it from scratch)",
    "deepseek_v3": "importing multi-head latent attention (DeepSeek-V2/V3) is not supported yet "
    "(arch=deepseek_v3 trains it from scratch)",
}


def fp8_problem(source: HFSource) -> str | None:
    """One line for FP8 block-scaled weights (DeepSeek-V3's release: ``quantization_config``
    with ``quant_method: fp8`` and a ``weight_scale_inv`` tensor beside each quantised weight);
    None for other checkpoints."""
    quant = getattr(source.config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    scaled = method == "fp8"
    if not scaled:
        try:
            scaled = any(name.endswith("weight_scale_inv") for name in source.files)
        except ImportError_:  # no weights to look at: the other checks name that
            return None
    if not scaled:
        return None
    block = quant.get("weight_block_size", [128, 128]) if isinstance(quant, dict) else [128, 128]
    return (f"{source.path}: FP8 block-scaled weights (weight_scale_inv tensors, one scale per "
            f"{block[0]}x{block[1]} block): dequantise to bf16 first (each block times its "
            "weight_scale_inv, as DeepSeek's fp8_cast_bf16.py does) and import that")  # fmt: skip


def moe_families() -> dict[str, str]:
    """transformers model_type -> our family, for the families with a transformers class."""
    out = {}
    for name in family_names():
        family = load_family(name)
        if family.hf_model_type:
            out[family.hf_model_type] = name
    return out


def supported() -> str:
    return ", ".join(sorted([*moe_families(), *DENSE]))


def check_supported(source: HFSource, upcycling: bool) -> str:
    """The family the source imports into; ImportError_ naming what is not supported."""
    kind = source.model_type
    fp8 = fp8_problem(source)
    if fp8:
        raise ImportError_(fp8)
    if kind in NOT_SUPPORTED:
        raise ImportError_(f"{source.path}: model_type {kind!r}: {NOT_SUPPORTED[kind]}")
    if kind in moe_families():
        if upcycling and not one_expert(source):
            raise ImportError_(f"{source.path} is already a MoE model ({kind}): import it "
                               "without --upcycle-experts")  # fmt: skip
        return moe_families()[kind]
    if kind in DENSE:
        if not upcycling:
            raise ImportError_(
                f"{source.path} is a dense {kind} model: mone-train trains mixtures of experts; "
                "upcycle it with --upcycle-experts E --upcycle-topk k"
            )
        return DENSE[kind][0]
    raise ImportError_(f"{source.path}: model_type {kind!r} is not supported (supported: "
                       f"{supported()})")  # fmt: skip


def one_expert(source: HFSource) -> bool:
    """A Mixtral of one expert: a dense model (softmax over one expert is 1), as mone-export
    writes a one-expert MoE; it upcycles like Llama."""
    c = source.config
    return source.model_type == "mixtral" and getattr(c, "num_local_experts", 0) == 1


def moe_prefix(source: HFSource, i: int) -> str:
    """Layer ``i``'s MoE block: Mixtral's checkpoints name it ``block_sparse_moe``."""
    block = f"model.layers.{i}.block_sparse_moe."
    return block if source.has(f"{block}gate.weight") else f"model.layers.{i}.mlp."


def dense_mlp(source: HFSource, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, D], up [I, D], down [D, I]) of layer ``i``'s dense MLP (or its one expert)."""
    if one_expert(source):
        fc1, fc2 = source.experts(moe_prefix(source, i), 1)
        gate, up = fc1[0].chunk(2)
        return gate, up, fc2[0]
    p = f"model.layers.{i}.mlp."
    t = source.tensor
    return t(f"{p}gate_proj.weight"), t(f"{p}up_proj.weight"), t(f"{p}down_proj.weight")


def rope_settings(source: HFSource) -> dict:
    """``rotary_base`` and ``rope_scaling`` of the source's RoPE (transformers keeps it in
    ``config.rope_parameters``); ImportError_ naming a rope_type we do not reproduce."""
    c = source.config
    params = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_PARAMETER_KEYS:
        raise ImportError_(f"{source.path}: rope_type {rope_type!r} is not supported "
                           f"(supported: {', '.join(ROPE_PARAMETER_KEYS)})")  # fmt: skip
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ImportError_(f"{source.path}: partial_rotary_factor "
                           f"{params['partial_rotary_factor']} is not supported (RoPE over the "
                           "whole head only)")  # fmt: skip
    scaling = {"rope_type": rope_type}
    scaling.update(
        {k: params[k] for k in ROPE_PARAMETER_KEYS[rope_type] if params.get(k) is not None}
    )
    if rope_type == "yarn" and "factor" not in scaling:  # DeepSeek: the ratio of the contexts
        original = scaling.get("original_max_position_embeddings", c.max_position_embeddings)
        scaling["factor"] = c.max_position_embeddings / original
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return {"rotary_base": float(theta or 10000.0), "rope_scaling": scaling}


def _refuse_what_we_cannot_reproduce(source: HFSource) -> None:
    c, where = source.config, source.path
    if getattr(c, "use_sliding_window", False) or (
        source.model_type == "mixtral" and getattr(c, "sliding_window", None)
    ):
        raise ImportError_(f"{where}: sliding-window attention is not supported")
    if source.model_type != "qwen2_moe" and getattr(c, "attention_bias", False):
        raise ImportError_(f"{where}: attention_bias (a bias on the output projection) is not "
                           "supported")  # fmt: skip
    if getattr(c, "mlp_bias", False):
        raise ImportError_(f"{where}: mlp_bias is not supported")
    if getattr(c, "clip_qkv", None) is not None:
        raise ImportError_(f"{where}: clip_qkv is not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ImportError_(f"{where}: hidden_act {c.hidden_act!r} is not supported (SwiGLU only)")


def _layer_pattern(source: HFSource) -> tuple[int, int]:
    """(first_dense_layers, moe_layer_freq) of Qwen's ``mlp_only_layers``/
    ``decoder_sparse_step`` (1, 1 elsewhere); ImportError_ when not expressible."""
    c = source.config
    layers = c.num_hidden_layers
    step = getattr(c, "decoder_sparse_step", 1) or 1
    only = set(getattr(c, "mlp_only_layers", None) or [])
    pattern = [int(i not in only and (i + 1) % step == 0) for i in range(layers)]
    for first in range(layers):
        for freq in range(1, layers + 1):
            if ModelConfig(num_layers=layers, first_dense_layers=first,
                           moe_layer_freq=freq).moe_layer_pattern() == pattern:  # fmt: skip
                return first, freq
    raise ImportError_(f"{source.path}: MoE layers {pattern} (mlp_only_layers, "
                       "decoder_sparse_step) are not first-dense + every-k-th")  # fmt: skip


def model_settings(source: HFSource, family: str) -> dict:
    """Every ``model.*`` value of the imported model (MoE sources)."""
    _refuse_what_we_cannot_reproduce(source)
    c = source.config
    first_dense, freq = _layer_pattern(source)
    head_dim = getattr(c, "head_dim", None)
    settings = {
        **dataclasses.asdict(ModelConfig()),
        **dataclasses.asdict(_recipe_defaults(family)),
        "name": f"imported-{source.model_type}",
        "family": family,
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": _groups(c),
        "head_dim": head_dim
        if head_dim and head_dim != c.hidden_size // c.num_attention_heads
        else None,
        "router_topk": c.num_experts_per_tok,
        "first_dense_layers": first_dense,
        "moe_layer_freq": freq,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        **rope_settings(source),
        "norm_epsilon": float(c.rms_norm_eps),
        "init_method_std": float(getattr(c, "initializer_range", 0.02)),
        "aux_loss_coeff": float(getattr(c, "router_aux_loss_coef", 0.01) or 0.0),
        "expert_granularity": 1,
    }
    settings.update(load_family(family).model_overrides(c))
    settings.setdefault("ffn_hidden_size", settings["moe_ffn_hidden_size"])
    if settings["first_dense_layers"] == 0 and settings["moe_layer_freq"] == 1:
        settings["ffn_hidden_size"] = settings["moe_ffn_hidden_size"]  # no dense layer uses it
    return settings


def _recipe_defaults(family: str) -> ModelConfig:
    """ModelConfig with the family's arch.yaml recipe (not its granularity interpolations)."""
    from omegaconf import OmegaConf

    from mone_train.families import ARCH_FILE, FAMILIES_DIR

    recipe = OmegaConf.to_container(OmegaConf.load(FAMILIES_DIR / family / ARCH_FILE))
    # values that interpolate the size's (a shared expert as wide as one routed expert) are
    # the imported model's to give
    plain = {k: v for k, v in recipe.items() if not (isinstance(v, str) and "${" in v)}
    return ModelConfig(**plain)


def _groups(c) -> int | None:
    groups = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return None if groups == c.num_attention_heads else groups


def dense_settings(source: HFSource, family: str, experts: int, topk: int, granularity: int):
    """Every ``model.*`` value of a dense source upcycled into ``experts`` experts (top-k)."""
    _refuse_what_we_cannot_reproduce(source)
    c = source.config
    width = c.intermediate_size
    if granularity < 1 or width % granularity:
        raise ImportError_(f"--granularity {granularity}: the dense MLP's {width} neurons do not "
                           "split into that many equal experts")  # fmt: skip
    if experts % granularity or experts < granularity:
        raise ImportError_(f"--upcycle-experts {experts} must be a multiple of --granularity "
                           f"{granularity} (copies of each of the {granularity} parts)")  # fmt: skip
    if topk % granularity or not granularity <= topk <= experts:
        raise ImportError_(
            f"--upcycle-topk {topk} must be a multiple of --granularity {granularity} in "
            f"[{granularity}, {experts}] (each token takes whole copies of the dense MLP)"
        )
    head_dim = getattr(c, "head_dim", None)
    settings = {
        **dataclasses.asdict(ModelConfig()),
        "name": f"upcycled-{source.model_type}",
        "family": family,
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": _groups(c),
        "head_dim": head_dim
        if head_dim and head_dim != c.hidden_size // c.num_attention_heads
        else None,
        "ffn_hidden_size": width,
        "num_experts": experts,
        "router_topk": topk,
        "moe_ffn_hidden_size": width // granularity,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        **rope_settings(source),
        "norm_epsilon": float(c.rms_norm_eps),
        "init_method_std": float(getattr(c, "initializer_range", 0.02)),
        "expert_granularity": 1,
    }
    settings.update(DENSE.get(source.model_type, (None, {}))[1])
    return settings


# ------------------------------------------------------------------------------- tensors


def _first(source: HFSource, *names: str) -> str:
    for name in names:
        if source.has(name):
            return name
    raise ImportError_(f"{source.path}: the weights lack {names[0]!r}")


def attention_tensors(source: HFSource, settings: dict, i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s attention and norms under megatron's names."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    heads, groups = settings["num_attention_heads"], settings["num_query_groups"]
    groups = groups or heads
    t = source.tensor
    out = {
        f"{m}input_layernorm.weight": t(f"{p}input_layernorm.weight"),
        f"{m}pre_mlp_layernorm.weight": t(f"{p}post_attention_layernorm.weight"),
        f"{m}self_attention.linear_qkv.weight": join_qkv(
            t(f"{p}self_attn.q_proj.weight"), t(f"{p}self_attn.k_proj.weight"),
            t(f"{p}self_attn.v_proj.weight"), heads, groups,
        ),
        f"{m}self_attention.linear_proj.weight": t(f"{p}self_attn.o_proj.weight"),
    }  # fmt: skip
    if settings["qkv_bias"]:
        out[f"{m}self_attention.linear_qkv.bias"] = join_qkv(
            t(f"{p}self_attn.q_proj.bias"), t(f"{p}self_attn.k_proj.bias"),
            t(f"{p}self_attn.v_proj.bias"), heads, groups,
        )  # fmt: skip
    if settings["qk_layernorm"] != "none":
        out[f"{m}self_attention.q_layernorm.weight"] = t(f"{p}self_attn.q_norm.weight")
        out[f"{m}self_attention.k_layernorm.weight"] = t(f"{p}self_attn.k_norm.weight")
    return out


def _swiglu(source: HFSource, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc1 = [gate | up], fc2) of a SwiGLU MLP with separate projections."""
    t = source.tensor
    fc1 = torch.cat([t(f"{prefix}gate_proj.weight"), t(f"{prefix}up_proj.weight")])
    return fc1, t(f"{prefix}down_proj.weight")


def mlp_tensors(source: HFSource, settings: dict, i: int, moe: bool) -> dict[str, torch.Tensor]:
    """Layer ``i``'s MLP (a MoE block or a dense MLP) under megatron's names."""
    m = f"decoder.layers.{i}.mlp."
    if not moe:
        fc1, fc2 = _swiglu(source, f"model.layers.{i}.mlp.")
        return {f"{m}linear_fc1.weight": fc1, f"{m}linear_fc2.weight": fc2}
    block = moe_prefix(source, i)
    out = {f"{m}router.weight": source.tensor(_first(source, f"{block}gate.weight"))}
    fc1, fc2 = source.experts(block, settings["num_experts"])
    for e in range(settings["num_experts"]):
        out[f"{m}experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
        out[f"{m}experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
    if settings["shared_expert_ffn_hidden_size"]:
        fc1, fc2 = _swiglu(source, f"{block}shared_expert.")
        out[f"{m}shared_experts.linear_fc1.weight"] = fc1
        out[f"{m}shared_experts.linear_fc2.weight"] = fc2
        if settings["shared_expert_gate"]:
            out[f"{m}shared_experts.gate_weight"] = source.tensor(
                f"{block}shared_expert_gate.weight"
            )
    return out


def outer_tensors(source: HFSource, settings: dict) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output layer under megatron's names."""
    out = {
        "embedding.word_embeddings.weight": source.tensor("model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": source.tensor("model.norm.weight"),
    }
    if not settings["tie_embeddings"]:
        out["output_layer.weight"] = source.tensor("lm_head.weight")
    return out


def megatron_state(source: HFSource, settings: dict) -> dict[str, torch.Tensor]:
    """The whole model's tensors under megatron's names (a MoE source)."""
    pattern = ModelConfig(num_layers=settings["num_layers"],
                          first_dense_layers=settings["first_dense_layers"],
                          moe_layer_freq=settings["moe_layer_freq"]).moe_layer_pattern()  # fmt: skip
    state = outer_tensors(source, settings)
    for i, moe in enumerate(pattern):
        state.update(attention_tensors(source, settings, i))
        state.update(mlp_tensors(source, settings, i, bool(moe)))
    return state
