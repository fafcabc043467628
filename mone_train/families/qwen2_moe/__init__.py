"""Qwen2-MoE: a shared expert behind a sigmoid gate, q/k/v biases, softmax over all experts then
top-k, renormalised only with ``norm_topk_prob``, dense layers listed in ``mlp_only_layers``
(transformers' Qwen2MoeForCausalLM)."""

from __future__ import annotations

from mone_train.families.base import Family, dense_layers


class Qwen2Moe(Family):
    def family_mismatch(self, cfg):
        m, moe = cfg.model, cfg.moe
        if not (m.shared_expert_ffn_hidden_size and m.shared_expert_gate):
            return "Qwen2-MoE layers have a gated shared expert"
        if moe.shared_expert_mone:
            return "the shared expert keeps K < F neurons"
        if m.qk_layernorm != "none":
            return "Qwen2-MoE has no QK-norm"
        return None

    def hf_config_kwargs(self, cfg):
        m = cfg.model
        return {
            "intermediate_size": m.ffn_hidden_size,
            "moe_intermediate_size": m.moe_ffn_hidden_size,
            "shared_expert_intermediate_size": m.shared_expert_ffn_hidden_size,
            "num_experts": m.num_experts,
            "norm_topk_prob": not m.router_pre_softmax,
            "decoder_sparse_step": 1,
            "mlp_only_layers": dense_layers(cfg),
            "qkv_bias": m.qkv_bias,
            "use_sliding_window": False,
            "router_aux_loss_coef": m.aux_loss_coeff,
        }

    def model_overrides(self, hf):
        return {
            "ffn_hidden_size": hf.intermediate_size,
            "moe_ffn_hidden_size": hf.moe_intermediate_size,
            "shared_expert_ffn_hidden_size": hf.shared_expert_intermediate_size,
            "shared_expert_gate": True,
            "num_experts": hf.num_experts,
            "router_pre_softmax": not hf.norm_topk_prob,
            "qkv_bias": bool(hf.qkv_bias),
        }


FAMILY = Qwen2Moe(
    "qwen2_moe", hf_class="Qwen2MoeForCausalLM", hf_model_type="qwen2_moe",
    attention_bias_on_output=False,  # older Qwen2-MoE configs name the q/k/v biases so
)  # fmt: skip
