"""A Hugging Face model -> our model settings and megatron-core's tensors (export's inverse).

Settings: the shape and recipe every transformers MoE class shares (read here) plus what the
family's folder translates (``Family.model_overrides``). Tensors: the names of
``mone_train/export/convert.py`` read backwards (fused ``linear_qkv`` joined per query group,
or multi-head latent attention's projections one by one; fc1 = [gate | up], experts stacked per
layer; DeepSeek-V3's multi-token prediction layers, stored after the decoder layers, into
megatron's MTP block). What differs between families' checkpoints (where the MoE block lives,
the shared expert's name, the selection bias, which dense models upcycle into it) is the
family's to say (``mone_train/families/base.py``): nothing here names a family. Whatever our
model cannot reproduce exactly (a RoPE other than plain, Llama 3's or YaRN, a sliding window,
biases on the output projection, quantised weights other than FP8 block-scaled ones) is
refused with one line naming it.
"""

from __future__ import annotations

import dataclasses

import torch

from mone_train.config import ROPE_PARAMETER_KEYS, ModelConfig
from mone_train.export.convert import MLA_NAMES, MTP_NAMES, join_qkv
from mone_train.families import family_names, load_family
from mone_train.families.base import Family
from mone_train.importer.hf_source import HFSource, ImportError_


def quantization_problem(source: HFSource) -> str | None:
    """One line for quantised weights the import cannot read; None for plain checkpoints and
    FP8 block-scaled ones (DeepSeek-V3's release: ``quant_method: fp8``, a
    ``weight_scale_inv`` beside each quantised weight), which :meth:`HFSource.tensor`
    dequantises block by block."""
    quant = getattr(source.config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict()
    method = quant.get("quant_method")
    if not quant or (method == "fp8" and quant.get("weight_block_size")):
        return None
    return (f"{source.path}: quantised weights (quant_method {method!r}) are not supported: "
            "import unquantised (bf16 or fp32) weights, or FP8 with weight_block_size (one "
            "weight_scale_inv per block)")  # fmt: skip


def moe_families() -> dict[str, str]:
    """transformers model_type -> our family, for the families with a transformers class."""
    out = {}
    for name in family_names():
        family = load_family(name)
        if family.hf_model_type:
            out[family.hf_model_type] = name
    return out


def dense_families() -> dict[str, tuple[str, dict]]:
    """Dense model_type -> (the family it upcycles into, the ``model.*`` its attention needs)."""
    out = {}
    for name in family_names():
        for kind, overrides in load_family(name).dense_sources.items():
            out[kind] = (name, overrides)
    return out


def source_family(source: HFSource) -> Family:
    """The family whose class wrote ``source`` (a bare :class:`Family` for dense models)."""
    name = moe_families().get(source.model_type)
    return load_family(name) if name else Family(source.model_type or "unknown")


def supported() -> str:
    return ", ".join(sorted([*moe_families(), *dense_families()]))


def check_supported(source: HFSource, upcycling: bool) -> str:
    """The family the source imports into; ImportError_ naming what is not supported."""
    kind = source.model_type
    quantized = quantization_problem(source)
    if quantized:
        raise ImportError_(quantized)
    if kind in moe_families():
        if upcycling and not one_expert(source):
            raise ImportError_(f"{source.path} is already a MoE model ({kind}): import it "
                               "without --upcycle-experts")  # fmt: skip
        return moe_families()[kind]
    if kind in dense_families():
        if not upcycling:
            raise ImportError_(
                f"{source.path} is a dense {kind} model: mone-train trains mixtures of experts; "
                "upcycle it with --upcycle-experts E --upcycle-topk k"
            )
        return dense_families()[kind][0]
    raise ImportError_(f"{source.path}: model_type {kind!r} is not supported (supported: "
                       f"{supported()})")  # fmt: skip


def one_expert(source: HFSource) -> bool:
    """A MoE checkpoint that is a dense model (a one-expert Mixtral, as mone-export writes a
    one-expert MoE); it upcycles like Llama."""
    return source_family(source).is_dense(source.config)


def moe_prefix(source: HFSource, layer: str) -> str:
    """The MoE block of the layer under ``layer`` (``model.layers.3.``): the first of the
    family's names (``Family.moe_blocks``) the checkpoint has."""
    blocks = source_family(source).moe_blocks
    for block in blocks:
        if source.has(f"{layer}{block}gate.weight"):
            return f"{layer}{block}"
    return f"{layer}{blocks[-1]}"


def dense_mlp(source: HFSource, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, D], up [I, D], down [D, I]) of layer ``i``'s dense MLP (or its one expert)."""
    if one_expert(source):
        fc1, fc2 = source.experts(moe_prefix(source, f"model.layers.{i}."), 1)
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
    family = source_family(source)
    if family.uses_sliding_window(c):
        raise ImportError_(f"{where}: sliding-window attention is not supported")
    if family.attention_bias_on_output and getattr(c, "attention_bias", False):
        raise ImportError_(f"{where}: attention_bias (a bias on the output projection) is not "
                           "supported")  # fmt: skip
    if getattr(c, "mlp_bias", False):
        raise ImportError_(f"{where}: mlp_bias is not supported")
    if getattr(c, "clip_qkv", None) is not None:
        raise ImportError_(f"{where}: clip_qkv is not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ImportError_(f"{where}: hidden_act {c.hidden_act!r} is not supported (SwiGLU only)")
    problem = family.import_problem(c)
    if problem:
        raise ImportError_(f"{where}: {problem}")


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
        "expert_granularity": 1,
        "mtp_num_layers": mtp_layers(source),
    }
    if getattr(c, "router_aux_loss_coef", None) is not None:  # else the family's recipe's
        settings["aux_loss_coeff"] = float(c.router_aux_loss_coef)
    settings.update(load_family(family).model_overrides(c))
    settings.setdefault("ffn_hidden_size", settings["moe_ffn_hidden_size"])
    if settings["first_dense_layers"] == 0 and settings["moe_layer_freq"] == 1:
        settings["ffn_hidden_size"] = settings["moe_ffn_hidden_size"]  # no dense layer uses it
    return settings


def mtp_layers(source: HFSource) -> int:
    """How many multi-token prediction layers the checkpoint holds: DeepSeek-V3's release stores
    them as layers ``num_hidden_layers + j`` (with ``eh_proj``), which transformers' model
    leaves unread; up to the config's ``num_nextn_predict_layers``."""
    c = source.config
    wanted = getattr(c, "num_nextn_predict_layers", 0) or 0
    count = 0
    while count < wanted and source.has(
        f"model.layers.{c.num_hidden_layers + count}.eh_proj.weight"
    ):
        count += 1
    return count


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
    settings.update(dense_families().get(source.model_type, (None, {}))[1])
    return settings


# ------------------------------------------------------------------------------- tensors


def attention_tensors(
    source: HFSource, settings: dict, hf: str, ours: str
) -> dict[str, torch.Tensor]:
    """The attention and norms of the layer under ``hf`` (``model.layers.3.``) under megatron's
    names (prefix ``ours``: ``decoder.layers.3.``)."""
    t = source.tensor
    out = {
        f"{ours}input_layernorm.weight": t(f"{hf}input_layernorm.weight"),
        f"{ours}pre_mlp_layernorm.weight": t(f"{hf}post_attention_layernorm.weight"),
    }
    if settings["multi_latent_attention"]:
        out.update(_latent_attention(source, settings, f"{hf}self_attn.", f"{ours}self_attention."))
        return out
    p, m = f"{hf}self_attn.", f"{ours}self_attention."
    heads, groups = settings["num_attention_heads"], settings["num_query_groups"]
    groups = groups or heads
    out[f"{m}linear_qkv.weight"] = join_qkv(
        t(f"{p}q_proj.weight"), t(f"{p}k_proj.weight"), t(f"{p}v_proj.weight"), heads, groups
    )
    out[f"{m}linear_proj.weight"] = t(f"{p}o_proj.weight")
    if settings["qkv_bias"]:
        out[f"{m}linear_qkv.bias"] = join_qkv(
            t(f"{p}q_proj.bias"), t(f"{p}k_proj.bias"), t(f"{p}v_proj.bias"), heads, groups
        )
    if settings["qk_layernorm"] != "none":
        out[f"{m}q_layernorm.weight"] = t(f"{p}q_norm.weight")
        out[f"{m}k_layernorm.weight"] = t(f"{p}k_norm.weight")
    return out


def _latent_attention(source: HFSource, settings: dict, p: str, m: str) -> dict:
    """Multi-head latent attention: each of transformers' DeepseekV3Attention projections is one
    of megatron's MLASelfAttention (``MLA_NAMES``), rows in the same order, except that a
    checkpoint with ``rope_interleave: false`` keeps each RoPE part's pairs half a part apart
    where megatron (and transformers' default) keeps them side by side: those rows are
    reordered here (the attention scores are the same)."""
    out = {}
    for theirs, name in MLA_NAMES.items():
        if source.has(f"{p}{theirs}.weight"):
            out[f"{m}{name}.weight"] = source.tensor(f"{p}{theirs}.weight")
    if getattr(source.config, "rope_interleave", True):
        return out
    rope, heads = settings["qk_pos_emb_head_dim"], settings["num_attention_heads"]
    order = torch.arange(rope).view(2, rope // 2).t().reshape(-1)  # halves -> pairs
    query = f"{m}linear_q_up_proj.weight" if settings["q_lora_rank"] else f"{m}linear_q_proj.weight"
    q = out[query].view(heads, -1, out[query].shape[-1])
    out[query] = torch.cat([q[:, :-rope], q[:, -rope:][:, order]], dim=1).flatten(0, 1)
    kv = out[f"{m}linear_kv_down_proj.weight"]
    out[f"{m}linear_kv_down_proj.weight"] = torch.cat([kv[:-rope], kv[-rope:][order]])
    return out


def _swiglu(source: HFSource, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc1 = [gate | up], fc2) of a SwiGLU MLP with separate projections."""
    t = source.tensor
    fc1 = torch.cat([t(f"{prefix}gate_proj.weight"), t(f"{prefix}up_proj.weight")])
    return fc1, t(f"{prefix}down_proj.weight")


def mlp_tensors(
    source: HFSource, settings: dict, hf: str, ours: str, moe: bool
) -> dict[str, torch.Tensor]:
    """The MLP (a MoE block or a dense MLP) of the layer under ``hf`` under megatron's names
    (prefix ``ours``)."""
    m = f"{ours}mlp."
    if not moe:
        fc1, fc2 = _swiglu(source, f"{hf}mlp.")
        return {f"{m}linear_fc1.weight": fc1, f"{m}linear_fc2.weight": fc2}
    family = source_family(source)
    block = moe_prefix(source, hf)
    out = {f"{m}router.weight": source.tensor(f"{block}gate.weight")}
    if settings["router_expert_bias"]:
        out[f"{m}router.expert_bias"] = source.tensor(f"{block}{family.hf_expert_bias}")
    fc1, fc2 = source.experts(block, settings["num_experts"])
    for e in range(settings["num_experts"]):
        out[f"{m}experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
        out[f"{m}experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
    if settings["shared_expert_ffn_hidden_size"]:
        fc1, fc2 = _swiglu(source, f"{block}{family.hf_shared_expert}")
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


def mtp_tensors(source: HFSource, settings: dict, j: int, moe: bool) -> dict[str, torch.Tensor]:
    """Multi-token prediction layer ``j`` (DeepSeek-V3's layer ``num_hidden_layers + j``) under
    megatron's MTP block names. Its own copies of the embedding and output layer
    (``embed_tokens``, ``shared_head.head``) are the main model's in the release, which
    megatron's MTP block shares: they are not read."""
    hf, ours = f"model.layers.{settings['num_layers'] + j}.", f"mtp.layers.{j}."
    out = {f"{ours}{name}": source.tensor(f"{hf}{theirs}") for theirs, name in MTP_NAMES.items()}
    layer = f"{ours}transformer_layer."
    out.update(attention_tensors(source, settings, hf, layer))
    out.update(mlp_tensors(source, settings, hf, layer, moe))
    return out


def megatron_state(source: HFSource, settings: dict) -> dict[str, torch.Tensor]:
    """The whole model's tensors under megatron's names (a MoE source)."""
    pattern = ModelConfig(num_layers=settings["num_layers"],
                          first_dense_layers=settings["first_dense_layers"],
                          moe_layer_freq=settings["moe_layer_freq"]).moe_layer_pattern()  # fmt: skip
    state = outer_tensors(source, settings)
    for i, moe in enumerate(pattern):
        hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        state.update(attention_tensors(source, settings, hf, ours))
        state.update(mlp_tensors(source, settings, hf, ours, bool(moe)))
    for j in range(settings["mtp_num_layers"]):  # each built like the last decoder layer
        state.update(mtp_tensors(source, settings, j, bool(pattern[-1])))
    return state
