"""OLMoE: every layer MoE, RMSNorm of the whole query and key projections, softmax over all
experts then top-k, renormalised only with ``norm_topk_prob`` (transformers' OlmoeForCausalLM)."""

from __future__ import annotations

from mone_train.families.base import Family, dense_layers


class Olmoe(Family):
    def family_mismatch(self, cfg):
        m = cfg.model
        if dense_layers(cfg):
            return "OLMoE has no dense layers"
        if m.shared_expert_ffn_hidden_size or m.qkv_bias:
            return "OLMoE has no shared expert or q/k/v biases"
        if m.qk_layernorm != "full":
            return "OLMoE normalises queries and keys over all heads (model.qk_layernorm=full)"
        return None

    def hf_config_kwargs(self, cfg):
        m = cfg.model
        return {
            "intermediate_size": m.moe_ffn_hidden_size,
            "num_experts": m.num_experts,
            "norm_topk_prob": not m.router_pre_softmax,
            "router_aux_loss_coef": m.aux_loss_coeff,
            "attention_bias": False,
            "clip_qkv": None,
        }

    def model_overrides(self, hf):
        return {
            "moe_ffn_hidden_size": hf.intermediate_size,
            "num_experts": hf.num_experts,
            "router_pre_softmax": not hf.norm_topk_prob,
            "qk_layernorm": "full",
        }


FAMILY = Olmoe("olmoe", hf_class="OlmoeForCausalLM", hf_model_type="olmoe")
