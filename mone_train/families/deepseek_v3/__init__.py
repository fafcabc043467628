"""DeepSeek-V3 as published: multi-head latent attention (megatron-core's ``MLASelfAttention``,
YaRN RoPE) with the routing recipe of the ``deepseek`` family (sigmoid scores with the
selection bias, group-limited top-k, scaling, a shared expert, dense first layers), and
multi-token prediction (megatron's MTP block).

transformers' ``DeepseekV3ForCausalLM`` is its class both ways: import reads it (and the MTP
layers the release stores after the decoder's, which that class ignores), export writes it
when the model is plain MoE in that recipe. ``arch=deepseek`` is the same routing recipe with
grouped-query attention instead of MLA (no transformers class).
"""

from __future__ import annotations

from mone_train.families.base import Family, dense_layers, require


class DeepseekV3(Family):
    def router_mismatch(self, cfg):
        """transformers' router: sigmoid scores, the selection bias, the top-k renormalised
        (for k > 1, as megatron does) and scaled, groups scored by their top two experts."""
        m = cfg.model
        return (
            require(m.router_score == "sigmoid" and not m.router_pre_softmax,
                    "DeepSeek-V3 scores experts with a sigmoid (model.router_score=sigmoid)")
            or require(m.router_expert_bias, "DeepSeek-V3 routes with the selection bias "
                       "(model.router_expert_bias=true)")
            or require(not m.router_num_groups or m.router_topk // m.router_group_topk == 2,
                       "transformers' DeepSeek-V3 scores an expert group by its top 2 experts, "
                       "megatron by its top router_topk / router_group_topk")
        )  # fmt: skip

    def family_mismatch(self, cfg):
        m, moe = cfg.model, cfg.moe
        pattern = m.moe_layer_pattern()
        first_moe = pattern.index(1) if 1 in pattern else len(pattern)
        return (
            require(dense_layers(cfg) == list(range(first_moe)),
                    "DeepSeek-V3's dense layers are the first ones (model.moe_layer_freq=1)")
            or require(bool(m.shared_expert_ffn_hidden_size)
                       and m.shared_expert_ffn_hidden_size % m.moe_ffn_hidden_size == 0,
                       "DeepSeek-V3 layers have shared experts as wide as routed ones")
            or require(not m.shared_expert_gate and not moe.shared_expert_mone,
                       "DeepSeek-V3's shared experts are ungated and keep every neuron")
        )  # fmt: skip

    def hf_config_kwargs(self, cfg):
        m = cfg.model
        return {
            "intermediate_size": m.ffn_hidden_size,
            "moe_intermediate_size": m.moe_ffn_hidden_size,
            "n_routed_experts": m.num_experts,
            "n_shared_experts": m.shared_expert_ffn_hidden_size // m.moe_ffn_hidden_size,
            "first_k_dense_replace": len(dense_layers(cfg)),
            "routed_scaling_factor": m.router_topk_scaling or 1.0,
            "n_group": m.router_num_groups or 1,
            "topk_group": m.router_group_topk or 1,
            "norm_topk_prob": m.router_topk > 1,  # megatron renormalises sigmoid top-k > 1
            "q_lora_rank": m.q_lora_rank,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_head_dim,
            "qk_rope_head_dim": m.qk_pos_emb_head_dim,
            "v_head_dim": m.v_head_dim,
            "head_dim": m.qk_pos_emb_head_dim,  # what transformers' RoPE rotates
            "rope_interleave": True,  # megatron's MLA rotates pairs side by side
            "attention_bias": False,
            "num_nextn_predict_layers": 0,  # the export's --with-mtp sets it
        }

    def import_problem(self, hf):
        k, groups = hf.num_experts_per_tok, hf.n_group or 1
        if hf.norm_topk_prob != (k > 1):
            return (f"norm_topk_prob={hf.norm_topk_prob} with {k} experts per token: megatron "
                    "renormalises a sigmoid top-k exactly when k > 1")  # fmt: skip
        if groups > 1 and k // (hf.topk_group or 1) != 2:
            return (f"n_group={groups}, topk_group={hf.topk_group}, num_experts_per_tok={k}: "
                    "transformers scores a group by its top 2 experts, megatron by its top "
                    "num_experts_per_tok / topk_group")  # fmt: skip
        return None

    def model_overrides(self, hf):
        groups = hf.n_group or 1
        return {
            "ffn_hidden_size": hf.intermediate_size,
            "moe_ffn_hidden_size": hf.moe_intermediate_size,
            "num_experts": hf.n_routed_experts,
            "shared_expert_ffn_hidden_size": hf.moe_intermediate_size * (hf.n_shared_experts or 0),
            "shared_expert_gate": False,
            "first_dense_layers": hf.first_k_dense_replace or 0,
            "moe_layer_freq": 1,
            "router_score": "sigmoid",
            "router_pre_softmax": False,
            "router_topk_scaling": None
            if hf.routed_scaling_factor == 1.0
            else float(hf.routed_scaling_factor),
            "router_num_groups": groups if groups > 1 else None,
            "router_group_topk": hf.topk_group if groups > 1 else None,
            "router_expert_bias": True,
            "multi_latent_attention": True,
            "num_query_groups": None,
            "head_dim": None,  # transformers' head_dim is the RoPE part's
            "q_lora_rank": hf.q_lora_rank,
            "kv_lora_rank": hf.kv_lora_rank,
            "qk_head_dim": hf.qk_nope_head_dim,
            "qk_pos_emb_head_dim": hf.qk_rope_head_dim,
            "v_head_dim": hf.v_head_dim,
        }


FAMILY = DeepseekV3(
    "deepseek_v3", hf_class="DeepseekV3ForCausalLM", hf_model_type="deepseek_v3",
    latent_attention=True, hf_shared_expert="shared_experts.",
    hf_expert_bias="gate.e_score_correction_bias",
)  # fmt: skip
