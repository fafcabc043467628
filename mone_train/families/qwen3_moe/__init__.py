"""Qwen3-MoE: per-head RMSNorm of queries and keys, softmax over all experts then top-k,
renormalised with ``norm_topk_prob``, dense layers listed in ``mlp_only_layers`` (transformers'
Qwen3MoeForCausalLM)."""

from __future__ import annotations

from mone_train.families.base import Family, dense_layers


class Qwen3Moe(Family):
    def family_mismatch(self, cfg):
        m = cfg.model
        if m.shared_expert_ffn_hidden_size:
            return "Qwen3-MoE has no shared expert"
        if m.qk_layernorm != "head":
            return "Qwen3-MoE normalises queries and keys per head (model.qk_layernorm=head)"
        if m.qkv_bias:
            return "Qwen3-MoE's attention_bias covers the output projection too"
        return None

    def hf_config_kwargs(self, cfg):
        m = cfg.model
        return {
            "intermediate_size": m.ffn_hidden_size,
            "moe_intermediate_size": m.moe_ffn_hidden_size,
            "num_experts": m.num_experts,
            "norm_topk_prob": not m.router_pre_softmax,
            "decoder_sparse_step": 1,
            "mlp_only_layers": dense_layers(cfg),
            "attention_bias": False,
            "use_sliding_window": False,
            "router_aux_loss_coef": m.aux_loss_coeff,
        }

    def model_overrides(self, hf):
        return {
            "ffn_hidden_size": hf.intermediate_size,
            "moe_ffn_hidden_size": hf.moe_intermediate_size,
            "num_experts": hf.num_experts,
            "router_pre_softmax": not hf.norm_topk_prob,
            "qk_layernorm": "head",
        }


FAMILY = Qwen3Moe(
    "qwen3_moe", hf_class="Qwen3MoeForCausalLM", hf_model_type="qwen3_moe", free_head_dim=True,
    dense_sources={"qwen3": {"qk_layernorm": "head"}},
)  # fmt: skip
