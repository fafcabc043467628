"""Configuration of a MoNE (Mixture of Neuron Experts) causal language model.

A GPT-style decoder as mone-train trains it with megatron-core: RMSNorm, RoPE (non-interleaved;
plain, Llama 3's or YaRN, as ``rope_parameters`` says),
grouped-query attention (optionally with q/k/v biases and RMSNorm of queries and keys, per head
or over all heads) or, with ``multi_latent_attention``, DeepSeek-V2/V3's multi-head latent
attention (queries through an RMSNorm-ed ``q_lora_rank`` latent or one projection, keys and
values from an RMSNorm-ed ``kv_lora_rank`` latent, each head ``qk_nope_head_dim`` wide without
RoPE plus ``qk_rope_head_dim`` with it, values ``v_head_dim`` wide), SwiGLU MLPs; the layers marked 1 in ``moe_layer_pattern`` (or every
``moe_layer_freq``-th from the first) are mixtures of experts with megatron-core's top-k
router (softmax or sigmoid scores, optional pre-softmax, group-limited routing, expert bias,
scaling) and optionally a shared expert (with a sigmoid gate), the others are dense. Inside
every routed expert each token keeps only the ``num_kept_neurons`` neurons with the largest
|SiLU(gate)| (all of them for a plain MoE model), ranked by |SiLU(gate)| * exp(neuron bias)
when the model was trained with the neuron-level balance bias.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

DECODE_PATHS = ("auto", "dense", "sparse")


class MoNEConfig(PreTrainedConfig):
    """Shape and MoNE settings; ``decode_path`` chooses the experts' path (see sparse_decode)."""

    model_type = "mone"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 258
    hidden_size: int = 128
    intermediate_size: int = 512  # dense layers' MLP width
    moe_intermediate_size: int = 256  # F, neurons per routed expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_freq: int = 1  # layers 0, f, 2f, ... are MoE layers (without a pattern)
    moe_layer_pattern: list[int] | None = None  # 1: MoE layer, 0: dense, one per layer
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # shared expert output times sigmoid(w . x)
    shared_expert_num_kept: int | None = None  # K of a MoNE shared expert; None: all
    router_score: str = "softmax"  # softmax | sigmoid
    router_pre_softmax: bool = False
    router_topk_scaling: float | None = None
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    router_expert_bias: bool = False  # sigmoid scores + bias choose the experts
    neuron_bias: bool = False  # routed experts rank |g| * exp(bias) (their `neuron_bias`)
    qk_layernorm: str = "none"  # none | head | full
    qkv_bias: bool = False
    # multi-head latent attention (DeepSeek-V2/V3) instead of grouped-query attention; its
    # head_dim is the RoPE part's (what RoPE rotates), as in transformers' DeepseekV3Config
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None  # None: one query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    neuron_keep_ratio: float = 1.0  # rho, as trained (informative; num_kept_neurons decides)
    num_kept_neurons: int | None = None  # K; None keeps all F (a plain MoE model)
    decode_path: str = "auto"  # auto | dense | sparse
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # transformers' RoPE parameters: rope_type default | llama3 | yarn, with that type's keys
    rope_parameters: dict | None = None
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.multi_latent_attention:
            self.head_dim = self.qk_rope_head_dim
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_kept_neurons is None:
            self.num_kept_neurons = self.moe_intermediate_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Shape rules (called by the config's strict validation)."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}]"
            )
        if not 1 <= self.num_kept_neurons <= self.moe_intermediate_size:
            raise ValueError(
                f"num_kept_neurons={self.num_kept_neurons} must be in "
                f"[1, moe_intermediate_size={self.moe_intermediate_size}]"
            )
        if self.decode_path not in DECODE_PATHS:
            raise ValueError(f"decode_path={self.decode_path!r} is not one of {DECODE_PATHS}")
        if self.router_score not in ("softmax", "sigmoid"):
            raise ValueError(f"router_score={self.router_score!r} is not softmax or sigmoid")
        if self.qk_layernorm not in ("none", "head", "full"):
            raise ValueError(f"qk_layernorm={self.qk_layernorm!r} is not none, head or full")
        if self.multi_latent_attention and self.head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"head_dim={self.head_dim} must equal qk_rope_head_dim={self.qk_rope_head_dim} "
                "under multi-head latent attention (RoPE rotates that part only)"
            )
        if self.multi_latent_attention and self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        pattern = self.moe_layer_pattern
        if pattern is not None and len(pattern) != self.num_hidden_layers:
            raise ValueError(
                f"moe_layer_pattern has {len(pattern)} entries for {self.num_hidden_layers} layers"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (0-based) is a mixture of experts."""
        if self.moe_layer_pattern is not None:
            return bool(self.moe_layer_pattern[layer_idx])
        return layer_idx % self.moe_layer_freq == 0


__all__ = ["MoNEConfig"]
