"""MoNE causal language model for Hugging Face transformers (torch + transformers only).

The forward pass reproduces megatron-core's GPTModel as mone-train builds it (the parity is
tested against megatron on the same tokens):

    embed -> N x [x + attn(RMSNorm(x)); x + mlp(RMSNorm(x))] -> RMSNorm -> lm_head

- attention: q/k/v/o projections (megatron's fused ``linear_qkv`` split per query group at
  export; q/k/v biases with ``qkv_bias``), RMSNorm of queries and keys per head or over all
  heads (``qk_layernorm``), RoPE over the whole head (base ``rope_theta``, halves rotated, not
  interleaved; Llama 3's or YaRN's frequencies and cos/sin factor with ``rope_parameters``),
  grouped-query attention, softmax scale 1/sqrt(head_dim), causal mask;
- or, with ``multi_latent_attention``, megatron-core's ``MLASelfAttention``: queries from
  ``q_b_proj(RMSNorm(q_a_proj(x)))`` (``q_proj(x)`` without a query latent), a key/value latent
  RMSNorm-ed and expanded per head by ``kv_b_proj`` plus one RoPE key shared by all heads
  (both from ``kv_a_proj_with_mqa``); RoPE only on each head's ``qk_rope_head_dim`` part, whose
  pairs the weights store side by side (megatron's layout, transformers' ``rope_interleave``);
  softmax scale 1/sqrt(qk_nope + qk_rope) times YaRN's mscale(factor, mscale_all_dim)^2; the
  cache holds the normed latent and the rotated RoPE key;
- MoE layers (``config.is_moe_layer``): megatron-core's router (``topk_routing_with_score_function``:
  fp32 logits; softmax over the k chosen logits, or over all experts before the top-k; or
  sigmoid scores, the expert bias used to choose only, renormalised over the k; group-limited
  choice; a scaling factor), each chosen expert's output scaled by its probability and summed,
  plus the shared expert (times sigmoid(w . x) with its gate) when there is one;
- routed experts: SwiGLU with the top ``num_kept_neurons`` neurons by |SiLU(gate)| per token
  (times exp(neuron bias) with ``neuron_bias``), dense masked or sparse
  (``sparse_decode.expert_forward``, chosen by ``config.decode_path``);
- dense layers: SwiGLU MLP of width ``intermediate_size``.

Token dropping (a training-time capacity factor) is not reproduced: every token reaches its
experts, as in every Hugging Face MoE model.

Legend: B batch, S sequence, N = B*S tokens, D hidden size, E experts, F neurons per expert,
H heads, G key/value heads, Dh head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep

from .configuration_mone import MoNEConfig

try:  # an exported model directory carries the kernel file beside this one
    from .sparse_decode import dense_masked_expert_forward, expert_forward
except ImportError:  # inside the mone_train package
    from mone_kernels.sparse_decode import dense_masked_expert_forward, expert_forward


class MoNERMSNorm(nn.RMSNorm):
    """torch's RMSNorm, as megatron-core's local layer spec uses it."""


class MoNERotaryEmbedding(nn.Module):
    """cos/sin of RoPE at given positions, computed as megatron-core computes them (fp32)."""

    def __init__(self, config: MoNEConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def rope_parameters(config: MoNEConfig) -> tuple[torch.Tensor, float]:
        """[Dh / 2] fp32 inverse frequencies and the factor on cos and sin: 1 / base^(2i / Dh),
        megatron-core's formula, for plain RoPE; transformers' own for Llama 3's and YaRN
        (``rope_parameters``), which megatron-core's scaled embeddings reproduce."""
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config)
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        return 1.0 / (config.rope_theta**exponents), 1.0

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, S, Dh] cos, [B, S, Dh] sin) in ``x``'s dtype."""
        freqs_BSd = position_ids_BS[..., None].float() * self.inv_freq.float().to(x.device)
        emb_BSDh = torch.cat((freqs_BSd, freqs_BSd), dim=-1)
        scale = self.attention_scaling
        return (emb_BSDh.cos() * scale).to(x.dtype), (emb_BSDh.sin() * scale).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos_BSDh: torch.Tensor, sin_BSDh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on [B, heads, S, Dh] queries and keys (rotate-half convention)."""
    cos, sin = cos_BSDh.unsqueeze(1), sin_BSDh.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit fp32 softmax; ``attention_mask`` is additive (or None)."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MoNEAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE and a KV cache."""

    def __init__(self, config: MoNEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm != "none":
            full = self.qk_layernorm == "full"
            eps = config.rms_norm_eps
            self.q_norm = MoNERMSNorm(q_width if full else self.head_dim, eps=eps)
            self.k_norm = MoNERMSNorm(kv_width if full else self.head_dim, eps=eps)

    def _project(self, hidden_BSD: torch.Tensor, proj: nn.Linear, norm: str) -> torch.Tensor:
        """[B, S, D] -> [B, heads, S, Dh], RMSNorm-ed over all heads or per head if asked."""
        out = proj(hidden_BSD)
        if norm and self.qk_layernorm == "full":
            out = getattr(self, norm)(out)
        out = out.view(*hidden_BSD.shape[:-1], -1, self.head_dim)
        if norm and self.qk_layernorm == "head":
            out = getattr(self, norm)(out)
        return out.transpose(1, 2)

    def forward(
        self,
        hidden_BSD: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, S, D] -> ([B, S, D], attention weights or None); appends K/V to ``cache``."""
        q = self._project(hidden_BSD, self.q_proj, "q_norm")
        k = self._project(hidden_BSD, self.k_proj, "k_norm")
        v = self._project(hidden_BSD, self.v_proj, "")
        q, k = apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*hidden_BSD.shape[:-1], -1)), weights


def _yarn_mscale(scale: float, weight: float) -> float:
    """YaRN's 0.1 w ln(s) + 1 (1 for s <= 1), megatron-core's ``_yarn_get_mscale``."""
    return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0


def _pairs_to_halves(x: torch.Tensor) -> torch.Tensor:
    """[..., r] with RoPE pairs side by side (x0, x1, x2, x3, ...) -> the rotate-half layout
    (x0, x2, ... | x1, x3, ...), as megatron-core's MLA reorders before rotating. Queries and
    keys are reordered alike, so their dot products are those of the pairs."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MoNELatentAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V2/V3) with decoupled RoPE and a cache of
    latents, computing what megatron-core's ``MLASelfAttention`` computes.

    Legend (besides the file's): C key/value latent width, Dn / Dr / Dv a head's query-key
    part without RoPE / with RoPE / value width.
    """

    def __init__(self, config: MoNEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.num_key_value_groups = 1  # every head has its own key and value
        self.is_causal = True
        qk_dim = self.nope_dim + self.rope_dim
        rope = config.rope_parameters or {}
        mscale = 1.0
        if rope.get("rope_type", "default") == "yarn":
            mscale = _yarn_mscale(rope["factor"], rope.get("mscale_all_dim") or 0.0)
        self.scaling = mscale * mscale / math.sqrt(qk_dim)
        width, eps, q_width = config.hidden_size, config.rms_norm_eps, self.num_heads * qk_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(width, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(width, config.q_lora_rank, bias=False)
            self.q_a_layernorm = MoNERMSNorm(config.q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(width, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = MoNERMSNorm(self.latent_dim, eps=eps)
        kv_width = self.num_heads * (self.nope_dim + self.v_dim)
        self.kv_b_proj = nn.Linear(self.latent_dim, kv_width, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, width, bias=False)

    def _queries(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, H, S, Dn + Dr]."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(hidden_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_BSD)))
        return q.view(*hidden_BSD.shape[:-1], self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        hidden_BSD: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, S, D] -> ([B, S, D], attention weights or None); appends the normed latent
        [B, 1, S, C] and the rotated RoPE key [B, 1, S, Dr] to ``cache``."""
        q_nope_BHSd, q_rope_BHSr = self._queries(hidden_BSD).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        latent_BSC, k_rope_BSr = self.kv_a_proj_with_mqa(hidden_BSD).split(
            [self.latent_dim, self.rope_dim], dim=-1
        )
        latent_B1SC = self.kv_a_layernorm(latent_BSC).unsqueeze(1)
        q_rope_BHSr, k_rope_B1Sr = apply_rotary(
            _pairs_to_halves(q_rope_BHSr),
            _pairs_to_halves(k_rope_BSr.unsqueeze(1)),
            *position_embeddings,
        )
        if cache is not None:
            latent_B1SC, k_rope_B1Sr = cache.update(latent_B1SC, k_rope_B1Sr, self.layer_idx)
        batch, _, length, _ = latent_B1SC.shape  # length: the cached positions too
        kv_BSHd = self.kv_b_proj(latent_B1SC.squeeze(1)).view(batch, length, self.num_heads, -1)
        k_nope_BHSd, v_BHSv = kv_BSHd.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope_BHSd, q_rope_BHSr), dim=-1)
        k = torch.cat((k_nope_BHSd, k_rope_B1Sr.expand(-1, self.num_heads, -1, -1)), dim=-1)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v_BHSv,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*hidden_BSD.shape[:-1], -1)), weights


class MoNEDenseMLP(nn.Module):
    """SwiGLU MLP (megatron's fc1 = [gate | up]): the dense layers' MLP, and the shared expert,
    which keeps only its top ``num_kept`` neurons per token when that is below its width."""

    def __init__(self, config: MoNEConfig, width: int | None = None, num_kept: int | None = None):
        super().__init__()
        width = width or config.intermediate_size
        self.num_kept = num_kept if num_kept is not None else width
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]: down(SiLU(gate) * up)."""
        gate_up = self.gate_up_proj(x)
        if self.num_kept == self.down_proj.in_features:
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        x_ND = x.reshape(-1, x.shape[-1])
        out = dense_masked_expert_forward(
            x_ND, self.gate_up_proj.weight, self.down_proj.weight.t(), self.num_kept
        )
        return out.view(x.shape)


def _group_limited_topk(scores_NE: torch.Tensor, k: int, groups: int, group_k: int):
    """megatron-core's group-limited top-k: the groups with the largest sums of their top
    k / group_k scores, then the top-k experts inside them -> (values, indices)."""
    num_tokens, num_experts = scores_NE.shape
    group_scores = scores_NE.view(num_tokens, groups, -1).topk(k // group_k, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=group_k, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(num_tokens, groups, num_experts // groups)
    masked = scores_NE.masked_fill(~score_mask.reshape(num_tokens, -1).bool(), float("-inf"))
    return torch.topk(masked, k=k, dim=-1)


class MoNERouter(nn.Module):
    """megatron-core's top-k router (fp32), as configured; ``expert_bias`` only chooses."""

    def __init__(self, config: MoNEConfig) -> None:
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def _topk(self, scores_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        groups, group_k = self.config.router_num_groups, self.config.router_group_topk
        if group_k:
            return _group_limited_topk(scores_NE, self.top_k, groups, group_k)
        return torch.topk(scores_NE, self.top_k, dim=-1)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, D] -> ([N, k] expert indices, [N, k] fp32 probabilities)."""
        c = self.config
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        if c.router_score == "softmax":
            if c.router_pre_softmax:
                probs_NK, experts_NK = self._topk(torch.softmax(logits_NE, dim=-1))
            else:
                top_logits_NK, experts_NK = self._topk(logits_NE)
                probs_NK = torch.softmax(top_logits_NK, dim=-1, dtype=torch.float32)
        else:
            scores_NE = torch.sigmoid(logits_NE)
            if self.expert_bias is not None:
                _, experts_NK = self._topk(scores_NE + self.expert_bias.float())
                probs_NK = torch.gather(scores_NE, 1, experts_NK)
            else:
                probs_NK, experts_NK = self._topk(scores_NE)
            if self.top_k > 1:
                probs_NK = probs_NK / (probs_NK.sum(dim=-1, keepdim=True) + 1e-20)
        if c.router_topk_scaling:
            probs_NK = probs_NK * c.router_topk_scaling
        return experts_NK, probs_NK


class MoNEExperts(nn.Module):
    """The routed experts' weights, stacked, in the layout the sparse path reads.

    ``gate_up_proj`` [E, 2F, D]: megatron's fc1 (gate rows, then up rows);
    ``down_proj_t`` [E, F, D]: W_down transposed (neuron j's output weights are row j);
    ``neuron_bias`` [E, F] (with ``config.neuron_bias``): the neuron-level balance bias.
    """

    MAX_ABS_BIAS = 30.0  # as mone_train.model.neuron_balance

    def __init__(self, config: MoNEConfig) -> None:
        super().__init__()
        shape = (config.num_experts, config.moe_intermediate_size, config.hidden_size)
        self.config = config
        self.gate_up_proj = nn.Parameter(torch.empty(shape[0], 2 * shape[1], shape[2]))
        self.down_proj_t = nn.Parameter(torch.empty(shape))
        if config.neuron_bias:
            self.register_buffer("neuron_bias", torch.zeros(shape[0], shape[1]))
        else:
            self.neuron_bias = None

    def forward(
        self, x_ND: torch.Tensor, experts_NK: torch.Tensor, probs_NK: torch.Tensor
    ) -> torch.Tensor:
        """Sum over each token's chosen experts of probability x expert output: [N, D]."""
        out_ND = torch.zeros_like(x_ND)
        num_kept, path = self.config.num_kept_neurons, self.config.decode_path
        weights_EF = None
        if self.neuron_bias is not None:
            weights_EF = torch.exp(
                self.neuron_bias.float().clamp(-self.MAX_ABS_BIAS, self.MAX_ABS_BIAS)
            )
        for expert in torch.unique(experts_NK).tolist():
            rows_T, slots_T = torch.nonzero(experts_NK == expert, as_tuple=True)
            y_TD = expert_forward(
                x_ND[rows_T],
                self.gate_up_proj[expert],
                self.down_proj_t[expert],
                num_kept,
                probs_NK[rows_T, slots_T],
                path=path,
                selection_weight_F=None if weights_EF is None else weights_EF[expert],
            )
            out_ND.index_add_(0, rows_T, y_TD.to(out_ND.dtype))
        return out_ND


class MoNESparseMoeBlock(nn.Module):
    """Router + routed MoNE experts, plus the shared expert (and its gate) when there is one."""

    def __init__(self, config: MoNEConfig) -> None:
        super().__init__()
        self.router = MoNERouter(config)
        self.experts = MoNEExperts(config)
        width = config.shared_expert_intermediate_size
        self.shared_expert = (
            MoNEDenseMLP(config, width, config.shared_expert_num_kept) if width else None
        )
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        )

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]: route every token, sum its experts' weighted outputs."""
        x_ND = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        experts_NK, probs_NK = self.router(x_ND)
        out_BSD = self.experts(x_ND, experts_NK, probs_NK).view(hidden_BSD.shape)
        if self.shared_expert is None:
            return out_BSD
        shared_BSD = self.shared_expert(hidden_BSD)
        if self.shared_expert_gate is not None:
            shared_BSD = shared_BSD * torch.sigmoid(self.shared_expert_gate(hidden_BSD))
        return out_BSD + shared_BSD


class MoNEDecoderLayer(nn.Module):
    """Pre-norm transformer layer: attention, then a MoE or dense MLP, each with a residual."""

    def __init__(self, config: MoNEConfig, layer_idx: int) -> None:
        super().__init__()
        attention = MoNELatentAttention if config.multi_latent_attention else MoNEAttention
        self.self_attn = attention(config, layer_idx)
        moe = config.is_moe_layer(layer_idx)
        self.mlp = MoNESparseMoeBlock(config) if moe else MoNEDenseMLP(config)
        self.input_layernorm = MoNERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoNERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_BSD: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]; appends this layer's keys and values to ``cache``."""
        attended, _ = self.self_attn(
            self.input_layernorm(hidden_BSD), position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_BSD = hidden_BSD + attended
        return hidden_BSD + self.mlp(self.post_attention_layernorm(hidden_BSD))


class MoNEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and capabilities shared by the MoNE model classes."""

    config_class = MoNEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MoNEDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Random weights for a fresh model; recomputes the RoPE buffer, which is not saved
        (loading builds the model on the meta device and fills only saved tensors)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoNEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj_t, mean=0.0, std=std)
            if module.neuron_bias is not None:
                init.zeros_(module.neuron_bias)
        elif isinstance(module, MoNERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                init.zeros_(module.expert_bias)
        elif isinstance(module, MoNERotaryEmbedding):
            init.copy_(module.inv_freq, MoNERotaryEmbedding.rope_parameters(self.config)[0])


class MoNEModel(MoNEPreTrainedModel):
    """The decoder stack without the language-model head."""

    def __init__(self, config: MoNEConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoNEDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = MoNERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoNERotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Hidden states after the final norm, and the (updated) KV cache."""
        cache = kwargs.pop("past_key_values", cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen
            position_ids = position_ids.unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        rotary = self.rotary_emb(inputs_embeds, position_ids)
        hidden_BSD = inputs_embeds
        for layer in self.layers:
            hidden_BSD = layer(hidden_BSD, rotary, mask, cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_BSD), cache=cache)


class MoNEForCausalLM(MoNEPreTrainedModel, GenerationMixin):
    """MoNE decoder with its language-model head; supports ``generate()`` with a KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoNEConfig) -> None:
        super().__init__(config)
        self.model = MoNEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits [B, S, V] (the last ``logits_to_keep`` positions when set), the LM
        loss when ``labels`` are given (shifted inside), and the KV cache."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_BSD = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_BSD)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["MoNEForCausalLM", "MoNEModel", "MoNEPreTrainedModel"]
