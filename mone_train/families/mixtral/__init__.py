"""Mixtral: every layer MoE, top-k over the router logits then softmax over the k (transformers'
MixtralForCausalLM: softmax over all experts, top-k, renormalised: the same probabilities)."""

from __future__ import annotations

from mone_train.families.base import Family, dense_layers


class Mixtral(Family):
    def family_mismatch(self, cfg):
        m = cfg.model
        if dense_layers(cfg):
            return "Mixtral has no dense layers"
        if m.shared_expert_ffn_hidden_size or m.qk_layernorm != "none" or m.qkv_bias:
            return "Mixtral has no shared expert, QK-norm or q/k/v biases"
        if m.router_pre_softmax and m.num_experts > 1:  # one expert: probability 1 either way
            return "Mixtral renormalises the top-k probabilities"
        return None

    def hf_config_kwargs(self, cfg):
        m = cfg.model
        return {
            "intermediate_size": m.moe_ffn_hidden_size,
            "num_local_experts": m.num_experts,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
            "router_aux_loss_coef": m.aux_loss_coeff,
        }

    def model_overrides(self, hf):
        return {
            "moe_ffn_hidden_size": hf.intermediate_size,
            "num_experts": hf.num_local_experts,
            "router_pre_softmax": False,
        }

    def is_dense(self, hf):
        """One expert (what mone-export writes for a dense model): it upcycles like Llama."""
        return getattr(hf, "num_local_experts", 0) == 1

    def uses_sliding_window(self, hf):
        return bool(getattr(hf, "sliding_window", None))  # Mixtral's has no use_ switch


FAMILY = Mixtral(
    "mixtral", hf_class="MixtralForCausalLM", hf_model_type="mixtral", free_head_dim=True,
    moe_blocks=("block_sparse_moe.", "mlp."),
    # dense models upcycle into the family whose attention matches theirs
    dense_sources={"llama": {}, "qwen2": {"qkv_bias": True}},
)  # fmt: skip
