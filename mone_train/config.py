"""Typed configuration: dataclasses behind every Hydra YAML group, and their validation.

The dataclasses are registered in Hydra's ConfigStore as the schema of ``configs/config.yaml``,
so an unknown key or a wrongly typed value fails while composing. :func:`validate` then checks
meaning: each section's ``validate()`` checks its own ranges, :meth:`Config.validate` the rules
that span sections, and each raises :class:`ConfigError` naming the key, the value and what would
be valid. This module needs neither torch nor megatron-core.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from mone_kernels.rules import IMPLS
from mone_train.errors import ConfigError

FLAVOURS = ("mone", "moe")
# bf16: weights, compute and activations in bf16; fp32 master weights, optimizer state and
# gradient reduction (mone_train/components/optimizer.py); checkpoints hold the fp32 masters either way.
PRECISIONS = ("fp32", "bf16")
RECOMPUTE = ("none", "moe", "full")  # activation recompute: off | MoE layers | whole layers
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("nccl", "gloo")
# Where a run computes: auto = CUDA when a device is present (MONE_TRAIN_DEVICE=cpu|cuda,
# as the test suite sets it, says what auto means: mone_train/parallel/process_groups.py).
DEVICES = ("auto", "cpu", "cuda")
DATA_SOURCES = ("stdlib", "indexed")
TOKENIZER_KINDS = ("byte", "hf", "sentencepiece")
ATTENTION_CORES = ("sdpa", "megatron")  # torch's fused SDPA | megatron's DotProductAttention
NORMS = ("fused", "torch")  # our RMSNorm (fused backward on CPU) | megatron's torch.nn.RMSNorm
ROUTER_SCORES = ("softmax", "sigmoid")
# megatron-core's moe_router_load_balancing_type: per micro batch | per sequence | per global batch
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
TOKEN_DROP_POLICIES = ("probs", "position")  # drop the lowest-probability | the latest tokens
QK_NORMS = ("none", "head", "full")  # per attention head (Qwen3) | over all heads (OLMoE)
NEURON_BALANCE = ("ng_lbl", "bias", "none")
# RoPE frequencies: plain | Llama 3.x scaling | YaRN (Qwen3, DeepSeek long context)
ROPE_TYPES = ("default", "llama3", "yarn")
# The keys of transformers' rope_parameters (besides rope_type, rope_theta) each type reads
ROPE_PARAMETER_KEYS = {
    "default": (),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"),
}  # fmt: skip
SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a validation set's name, as it appears in keys


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {valid}")


def _require_positive(section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 1, f"{section}.{name}", value, "an integer >= 1")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling as released checkpoints state it (``model.rope_scaling``): the
    fields of transformers' ``rope_parameters`` (without ``rope_theta``, which is
    ``model.rotary_base``), so an import copies them and an export writes them back.

    ``llama3`` reads ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``; ``yarn`` reads ``factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``truncate`` and the
    cos/sin scale ``attention_factor`` (null: from ``factor``, ``mscale`` and
    ``mscale_all_dim`` as transformers derives it, :meth:`yarn_attention_factor`).
    """

    rope_type: str = "default"  # default | llama3 | yarn
    factor: float = 1.0  # how many times the pretraining context the model was stretched to
    original_max_position_embeddings: Optional[int] = None  # the pretraining context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: rotations below which a dimension is interpolated ...
    beta_slow: float = 1.0  # ... and above which it is kept (extrapolated)
    mscale: Optional[float] = None  # yarn (DeepSeek): attention scale's numerator weight
    mscale_all_dim: Optional[float] = None  # yarn (DeepSeek): its denominator weight
    attention_factor: Optional[float] = None  # yarn: cos/sin times this; null: derived
    truncate: bool = True  # yarn: the correction range rounded to whole dimensions

    def yarn_attention_factor(self) -> float:
        """The factor on YaRN's cos and sin, as transformers' ``_compute_yarn_parameters``
        derives it: ``attention_factor``, else 0.1 ln(s) + 1 (a ratio of two such terms
        weighted by ``mscale`` / ``mscale_all_dim`` when both are set and nonzero)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, weight: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(
                self.factor, self.mscale_all_dim
            )
        return get_mscale(self.factor)

    def hf_parameters(self, rope_theta: float, max_position_embeddings: int) -> dict:
        """transformers' ``rope_parameters`` of this RoPE (what an export writes)."""
        out = {"rope_type": self.rope_type, "rope_theta": rope_theta}
        for key in ROPE_PARAMETER_KEYS[self.rope_type]:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.rope_type != "default":
            out["original_max_position_embeddings"] = self.original_context(max_position_embeddings)
        return out

    def original_context(self, max_position_embeddings: int) -> int:
        """The pretraining context (``original_max_position_embeddings``, else the model's)."""
        return self.original_max_position_embeddings or max_position_embeddings

    def validate(self) -> None:
        """A known type and positive parameters."""
        key = "model.rope_scaling"
        _require(self.rope_type in ROPE_TYPES, f"{key}.rope_type", self.rope_type,
                 f"one of {list(ROPE_TYPES)}")  # fmt: skip
        if self.rope_type == "default":
            return
        _require(self.factor >= 1, f"{key}.factor", self.factor, "a number >= 1")
        if self.original_max_position_embeddings is not None:
            _require(self.original_max_position_embeddings >= 1,
                     f"{key}.original_max_position_embeddings",
                     self.original_max_position_embeddings, "null or an integer >= 1")  # fmt: skip
        if self.rope_type == "llama3":
            _require(0 < self.low_freq_factor < self.high_freq_factor, f"{key}.high_freq_factor",
                     self.high_freq_factor,
                     f"a number > model.rope_scaling.low_freq_factor={self.low_freq_factor} "
                     "> 0")  # fmt: skip
        else:
            _require(self.beta_fast > 0 and self.beta_slow > 0, f"{key}.beta_fast",
                     (self.beta_fast, self.beta_slow), "beta_fast and beta_slow > 0")  # fmt: skip
            if self.attention_factor is not None:
                # megatron derives the factor from the scale, which cannot move it at s = 1
                _require(self.attention_factor > 0 and (self.factor > 1
                         or self.attention_factor == 1), f"{key}.attention_factor",
                         self.attention_factor, "null or a number > 0 (1 when "
                         "model.rope_scaling.factor=1)")  # fmt: skip


@dataclass
class ModelConfig:
    """Transformer shape (the ``model`` group: sizes) and MoE recipe (the ``arch`` group:
    families, which write into this section too). ``vocab_size: null`` takes the tokenizer's."""

    name: str = "tiny"
    family: str = "mixtral"  # the architecture family, mone_train/families/<family>/
    # Routed experts of the size configs scale with it: g x experts, g x top-k, F / g neurons.
    expert_granularity: int = 1
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None  # null: hidden_size / num_attention_heads (Qwen3 sets it)
    ffn_hidden_size: int = 256  # dense MLP width, used by layers that moe_layer_freq leaves dense
    num_experts: int = 4
    router_topk: int = 2
    moe_ffn_hidden_size: int = 128  # F, neurons per routed expert
    moe_layer_freq: int = 1  # every k-th layer is MoE, starting with the first
    aux_loss_coeff: float = 1e-2
    max_position_embeddings: int = 1024
    vocab_size: Optional[int] = None
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    dropout: float = 0.0
    attention: str = "sdpa"  # core attention: sdpa (torch's fused kernels) | megatron (baddbmm)
    norm: str = "fused"  # RMSNorm: fused (ours; fused backward on CPU) | torch (megatron's)
    rope_fusion: bool = True  # megatron's apply_rope_fusion (TE's kernel, or ours on CPU)
    rotary_base: float = 10000.0  # RoPE theta
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: float = 1e-5  # RMSNorm epsilon (all norms)
    qk_layernorm: str = "none"  # RMSNorm of queries and keys: none | head | full (all heads)
    qkv_bias: bool = False  # biases on the query/key/value projection (Qwen2)
    # Multi-head latent attention (DeepSeek-V2/V3; megatron-core's MLASelfAttention) instead of
    # grouped-query attention: queries through an RMSNorm-ed rank-q_lora_rank latent (null: one
    # full-rank projection, as DeepSeek-V2-Lite), keys and values through one shared RMSNorm-ed
    # rank-kv_lora_rank latent; each head's query and key are qk_head_dim wide without RoPE plus
    # qk_pos_emb_head_dim with it (the key's RoPE part shared by all heads), its value
    # v_head_dim wide. RoPE: model.rope_scaling (default or yarn).
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # Multi-token prediction (DeepSeek-V3; megatron-core's MTP block, on the last pipeline
    # stage): this many extra layers after the last one, the i-th predicting token t + 1 + i
    # from its predecessor's output and the embedding of token t + i (0: none); their mean
    # loss times mtp_loss_scaling_factor joins the LM loss's gradient (logged as mtp_loss).
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    first_dense_layers: int = 0  # the first n layers have a dense MLP (DeepSeek)
    # Shared experts: an always-on SwiGLU MLP of this width beside the routed ones (0: none),
    # its output optionally scaled by sigmoid(w . x) (Qwen2-MoE's gate).
    shared_expert_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False
    router_score: str = "softmax"  # softmax | sigmoid
    router_pre_softmax: bool = False  # softmax over all experts, then top-k (no renormalising)
    router_topk_scaling: Optional[float] = None  # routing weights times this (DeepSeek-V3: 2.5)
    router_num_groups: Optional[int] = None  # group-limited routing: expert groups ...
    router_group_topk: Optional[int] = None  # ... of which each token may use this many
    # Auxiliary-loss-free balancing: a per-expert bias on the sigmoid scores, for selection only,
    # moved by router_bias_update_rate x sign(mean load - load) after every step.
    router_expert_bias: bool = False
    router_bias_update_rate: float = 1e-3
    load_balancing: str = "aux_loss"  # aux_loss | seq_aux_loss | global_aux_loss | none
    z_loss_coeff: float = 0.0  # router z-loss (OLMoE, ST-MoE)
    # Token dropping: each expert takes at most capacity_factor x its even share of the tokens.
    capacity_factor: Optional[float] = None
    token_drop_policy: str = "probs"  # probs | position
    pad_to_capacity: bool = False  # pad every expert's input to its capacity

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # ModelConfig(**settings) of plain values
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)

    def attention_head_dim(self) -> int:
        """The size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def moe_layer_pattern(self) -> list[int]:
        """1 for each MoE layer, 0 for each dense one: after the first ``first_dense_layers``
        dense layers, every ``moe_layer_freq``-th layer is MoE, starting with the first."""
        return [
            int(
                i >= self.first_dense_layers
                and (i - self.first_dense_layers) % self.moe_layer_freq == 0
            )
            for i in range(self.num_layers)
        ]

    def validate(self) -> None:
        """Shape rules of the transformer and its MoE layers."""
        _require_positive(
            "model",
            self,
            (
                "num_layers",
                "hidden_size",
                "num_attention_heads",
                "ffn_hidden_size",
                "num_experts",
                "moe_ffn_hidden_size",
                "max_position_embeddings",
            ),
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "model.num_attention_heads",
                self.num_attention_heads,
                f"a divisor of model.hidden_size={self.hidden_size} (or set model.head_dim)",
            )
        else:
            _require(self.head_dim >= 1, "model.head_dim", self.head_dim, "null or an integer >= 1")
        if self.num_query_groups is not None:
            _require(
                self.num_query_groups >= 1
                and self.num_attention_heads % self.num_query_groups == 0,
                "model.num_query_groups",
                self.num_query_groups,
                f"null or a divisor of model.num_attention_heads={self.num_attention_heads}",
            )
        _require(
            1 <= self.router_topk <= self.num_experts,
            "model.router_topk",
            self.router_topk,
            f"an integer in [1, model.num_experts={self.num_experts}]",
        )
        _require(
            1 <= self.moe_layer_freq <= self.num_layers,
            "model.moe_layer_freq",
            self.moe_layer_freq,
            f"an integer in [1, model.num_layers={self.num_layers}]",
        )
        _require(
            self.aux_loss_coeff >= 0, "model.aux_loss_coeff", self.aux_loss_coeff, "a number >= 0"
        )
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")
        _require(
            self.attention in ATTENTION_CORES,
            "model.attention",
            self.attention,
            f"one of {list(ATTENTION_CORES)}",
        )
        _require(self.norm in NORMS, "model.norm", self.norm, f"one of {list(NORMS)}")
        _require(
            self.init_method_std > 0, "model.init_method_std", self.init_method_std, "a number > 0"
        )
        self._validate_recipe()
        if self.vocab_size is not None:
            _require(
                self.vocab_size >= 2, "model.vocab_size", self.vocab_size, "null or an integer >= 2"
            )

    def _validate_recipe(self) -> None:
        """The MoE recipe: family, dense layers, shared experts, router, balancing, capacity."""
        from mone_train.families import family_names

        _require(self.family in family_names(), "model.family", self.family,
                 f"one of {family_names()} (set it with arch=<family>)")  # fmt: skip
        _require(self.expert_granularity >= 1, "model.expert_granularity",
                 self.expert_granularity, "an integer >= 1")  # fmt: skip
        _require(0 <= self.first_dense_layers < self.num_layers, "model.first_dense_layers",
                 self.first_dense_layers,
                 f"an integer in [0, model.num_layers={self.num_layers}) (one MoE layer at "
                 "least)")  # fmt: skip
        _require(self.shared_expert_ffn_hidden_size >= 0, "model.shared_expert_ffn_hidden_size",
                 self.shared_expert_ffn_hidden_size, "0 (no shared expert) or a width >= 1")  # fmt: skip
        if self.shared_expert_gate:
            _require(self.shared_expert_ffn_hidden_size > 0, "model.shared_expert_gate", True,
                     "false without a shared expert (model.shared_expert_ffn_hidden_size=0)")  # fmt: skip
        _require(self.router_score in ROUTER_SCORES, "model.router_score", self.router_score,
                 f"one of {list(ROUTER_SCORES)}")  # fmt: skip
        if self.router_expert_bias:
            _require(self.router_score == "sigmoid", "model.router_expert_bias", True,
                     "false unless model.router_score=sigmoid (the bias shifts sigmoid scores)")  # fmt: skip
        _require(self.router_bias_update_rate >= 0, "model.router_bias_update_rate",
                 self.router_bias_update_rate, "a number >= 0")  # fmt: skip
        if self.router_topk_scaling is not None:
            _require(self.router_topk_scaling > 0, "model.router_topk_scaling",
                     self.router_topk_scaling, "null or a number > 0")  # fmt: skip
        if self.router_topk == 1 and self.router_score == "softmax":
            _require(self.router_pre_softmax, "model.router_pre_softmax", False,
                     "true with model.router_topk=1 (a softmax over one chosen logit is 1 and "
                     "gives the router no gradient)")  # fmt: skip
        self._validate_groups()
        _require(self.load_balancing in LOAD_BALANCING, "model.load_balancing",
                 self.load_balancing, f"one of {list(LOAD_BALANCING)}")  # fmt: skip
        _require(self.z_loss_coeff >= 0, "model.z_loss_coeff", self.z_loss_coeff, "a number >= 0")
        if self.capacity_factor is not None:
            _require(self.capacity_factor > 0 and math.isfinite(self.capacity_factor),
                     "model.capacity_factor", self.capacity_factor,
                     "null (no token dropping) or a number > 0")  # fmt: skip
        _require(self.token_drop_policy in TOKEN_DROP_POLICIES, "model.token_drop_policy",
                 self.token_drop_policy, f"one of {list(TOKEN_DROP_POLICIES)}")  # fmt: skip
        if self.pad_to_capacity:
            _require(self.capacity_factor is not None, "model.pad_to_capacity", True,
                     "false without model.capacity_factor")  # fmt: skip
        _require(self.qk_layernorm in QK_NORMS, "model.qk_layernorm", self.qk_layernorm,
                 f"one of {list(QK_NORMS)}")  # fmt: skip
        _require(self.rotary_base > 0, "model.rotary_base", self.rotary_base, "a number > 0")
        self.rope_scaling.validate()
        if self.multi_latent_attention:
            self._validate_mla()
        _require(self.mtp_num_layers >= 0, "model.mtp_num_layers", self.mtp_num_layers,
                 "an integer >= 0 (0: no multi-token prediction)")  # fmt: skip
        _require(self.mtp_loss_scaling_factor >= 0, "model.mtp_loss_scaling_factor",
                 self.mtp_loss_scaling_factor, "a number >= 0")  # fmt: skip
        _require(self.norm_epsilon > 0, "model.norm_epsilon", self.norm_epsilon, "a number > 0")

    def _validate_mla(self) -> None:
        """Multi-head latent attention: its sizes, and the options megatron's MLA lacks."""
        for name in ("kv_lora_rank", "qk_head_dim", "v_head_dim"):
            _require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name),
                     "an integer >= 1")  # fmt: skip
        _require(self.qk_pos_emb_head_dim >= 2 and self.qk_pos_emb_head_dim % 2 == 0,
                 "model.qk_pos_emb_head_dim", self.qk_pos_emb_head_dim,
                 "an even integer >= 2 (RoPE rotates pairs)")  # fmt: skip
        if self.q_lora_rank is not None:
            _require(self.q_lora_rank >= 1, "model.q_lora_rank", self.q_lora_rank,
                     "null (full-rank queries) or an integer >= 1")  # fmt: skip
        _require(self.qk_layernorm == "none", "model.qk_layernorm", self.qk_layernorm,
                 "none with model.multi_latent_attention=true (MLA normalises its query and "
                 "key/value latents; megatron's MLA has no per-head or all-head QK-norm)")  # fmt: skip
        _require(self.num_query_groups is None, "model.num_query_groups", self.num_query_groups,
                 "null with model.multi_latent_attention=true (every head has its own key and "
                 "value)")  # fmt: skip
        _require(self.attention == "sdpa", "model.attention", self.attention,
                 "sdpa with model.multi_latent_attention=true (megatron's local "
                 "DotProductAttention takes no separate key and value head sizes)")  # fmt: skip
        rs = self.rope_scaling
        _require(rs.rope_type in ("default", "yarn"), "model.rope_scaling.rope_type",
                 rs.rope_type, "default or yarn with model.multi_latent_attention=true "
                 "(megatron's MLA has no Llama 3 scaling)")  # fmt: skip
        if rs.rope_type == "yarn":
            _require(rs.truncate, "model.rope_scaling.truncate", False,
                     "true with model.multi_latent_attention=true (megatron's MLA rounds YaRN's "
                     "correction range to whole dimensions)")  # fmt: skip

    def _validate_groups(self) -> None:
        """Group-limited routing: groups divide the experts, the top-k spreads evenly over the
        chosen groups (megatron takes top-k / group-top-k experts from each)."""
        groups, group_topk = self.router_num_groups, self.router_group_topk
        if groups is None and group_topk is None:
            return
        _require(groups is not None and group_topk is not None, "model.router_num_groups",
                 groups, "set together with model.router_group_topk (or both null)")  # fmt: skip
        _require(groups >= 1 and self.num_experts % groups == 0, "model.router_num_groups",
                 groups, f"a divisor of model.num_experts={self.num_experts}")  # fmt: skip
        per_group = self.num_experts // groups
        _require(1 <= group_topk <= groups and self.router_topk % group_topk == 0
                 and self.router_topk // group_topk <= per_group, "model.router_group_topk",
                 group_topk, f"an integer in [1, {groups}] dividing model.router_topk="
                 f"{self.router_topk} into at most {per_group} experts per group")  # fmt: skip


@dataclass
class MoEConfig:
    """Expert flavour: ``mone`` (neuron top-k inside experts) or the plain ``moe`` baseline."""

    flavour: str = "mone"
    neuron_keep_ratio: float = 0.5  # rho; K = max(1, round(rho * F)) neurons kept per token
    ng_lbl_coeff: float = 1e-2  # beta of the neuron-granular load-balance loss; 0 disables it
    kernel_impl: str = "auto"
    # fc1 and fc2 of all local experts as one grouped GEMM each (same parameters, checkpoints
    # and results as the expert-by-expert loop). null: on with CUDA only (on CPU the grouped
    # GEMM is a loop over experts too and measured no faster, benchmarks/trainer_throughput.py).
    grouped_gemm: Optional[bool] = None
    shared_expert_mone: bool = False  # keep the top-K neurons in shared experts too
    # How neurons are kept in use: ng_lbl (the loss, weight ng_lbl_coeff) | bias (a per-neuron
    # selection bias moved by neuron_bias_update_rate x the sign of the use error) | none.
    neuron_balance: str = "ng_lbl"
    neuron_bias_update_rate: float = 1e-3

    def grouped_on(self, device_type: str) -> bool:
        """Whether the experts run as grouped GEMMs on a ``device_type`` ('cuda', 'cpu') device."""
        return self.grouped_gemm if self.grouped_gemm is not None else device_type == "cuda"

    def validate(self) -> None:
        """Flavour, keep ratio (any ratio in (0, 1] gives a valid K), NG-LBL weight, kernel."""
        _require(self.flavour in FLAVOURS, "moe.flavour", self.flavour, f"one of {list(FLAVOURS)}")
        _require(
            0.0 < self.neuron_keep_ratio <= 1.0,
            "moe.neuron_keep_ratio",
            self.neuron_keep_ratio,
            "a ratio in (0, 1]",
        )
        _require(self.ng_lbl_coeff >= 0, "moe.ng_lbl_coeff", self.ng_lbl_coeff, "a number >= 0")
        _require(
            self.kernel_impl in IMPLS, "moe.kernel_impl", self.kernel_impl, f"one of {list(IMPLS)}"
        )
        _require(self.neuron_balance in NEURON_BALANCE, "moe.neuron_balance",
                 self.neuron_balance, f"one of {list(NEURON_BALANCE)}")  # fmt: skip
        _require(self.neuron_bias_update_rate >= 0, "moe.neuron_bias_update_rate",
                 self.neuron_bias_update_rate, "a number >= 0")  # fmt: skip
        if self.flavour == "moe":
            _require(self.neuron_balance != "bias", "moe.neuron_balance", "bias",
                     "ng_lbl or none with moe=moe (plain experts select no neurons)")  # fmt: skip
            _require(not self.shared_expert_mone, "moe.shared_expert_mone", True,
                     "false with moe=moe")  # fmt: skip

    def ng_lbl_on(self) -> bool:
        """Whether the neuron-granular balance loss is added."""
        return self.flavour == "mone" and self.neuron_balance == "ng_lbl" and self.ng_lbl_coeff > 0

    def neuron_bias_on(self) -> bool:
        """Whether MoNE experts keep a per-neuron selection bias."""
        return self.flavour == "mone" and self.neuron_balance == "bias"


@dataclass
class TokenizerConfig:
    """``byte`` (built in), ``hf`` (a tokenizer.json) or ``sentencepiece`` (a .model file)."""

    type: str = "byte"
    path: Optional[str] = None  # a local file (or, for hf, its folder); never downloaded
    eod_token: Optional[str] = None  # hf only: the end-of-document token when not a usual name

    def validate(self) -> None:
        """A known kind, a file for the kinds that read one, eod_token only for hf."""
        _require(
            self.type in TOKENIZER_KINDS,
            "data.tokenizer.type",
            self.type,
            f"one of {list(TOKENIZER_KINDS)}",
        )
        if self.type != "byte":
            _require(bool(self.path), "data.tokenizer.path", self.path, "a local tokenizer file")
        if self.eod_token is not None:
            _require(
                self.type == "hf",
                "data.tokenizer.eod_token",
                self.eod_token,
                "null unless data.tokenizer.type=hf (byte and sentencepiece fix their own)",
            )


@dataclass
class DataConfig:
    """Training data: the built-in ``stdlib`` corpus, or a weighted blend of ``indexed`` datasets.

    ``stdlib``: the running Python's standard-library sources, tokenized with ``tokenizer`` and
    cached; every ``valid_every``-th document is the validation split. ``indexed``: ``paths`` are
    megatron-core indexed dataset prefixes (``<prefix>.bin/.idx``, as ``mone-preprocess``
    writes them), blended by ``weights`` (null: in proportion to their sizes) and split train/valid/test by ``split``.
    """

    name: str = "stdlib"
    cache_dir: str = "${oc.env:MONE_TRAIN_CACHE,'~/.cache/mone-train'}"
    valid_every: int = 50  # stdlib: every n-th document (in sorted order) is held out
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    paths: list[str] = field(default_factory=list)  # indexed: dataset prefixes
    weights: Optional[list[float]] = None  # indexed: one per path (null: by dataset size)
    split: list[float] = field(default_factory=lambda: [98.0, 2.0, 0.0])  # train, valid, test
    index_cache_dir: Optional[str] = None  # megatron's sample-index cache; null: <cache_dir>/index
    # Seed of the validation/test sample draw; null: trainer.seed. Fix it to compare seeds on the
    # same held-out tokens (the seed studies do).
    eval_seed: Optional[int] = None

    def validate(self) -> None:
        """Source, tokenizer, and for ``indexed`` the paths, weights and split."""
        _require(self.name in DATA_SOURCES, "data.name", self.name, f"one of {list(DATA_SOURCES)}")
        _require(self.valid_every >= 1, "data.valid_every", self.valid_every, "an integer >= 1")
        self.tokenizer.validate()
        if self.name == "stdlib":
            return
        _require(len(self.paths) >= 1, "data.paths", list(self.paths), "a list of dataset prefixes")
        if self.weights is not None:
            _require(
                len(self.weights) == len(self.paths),
                "data.weights",
                list(self.weights),
                f"null or one weight per path ({len(self.paths)} paths)",
            )
            _require(
                all(w > 0 and math.isfinite(w) for w in self.weights),
                "data.weights",
                list(self.weights),
                "finite numbers > 0",
            )
        shares = list(self.split)
        _require(
            len(shares) == 3 and all(n >= 0 for n in shares) and shares[0] > 0 and shares[1] > 0,
            "data.split",
            shares,
            "three shares [train, valid, test] with train and valid > 0, e.g. [98,2,0]",
        )


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a decay schedule down to ``min_lr_ratio * lr``."""

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 50
    schedule: str = "cosine"
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA): one pass per weight

    def validate(self) -> None:
        """AdamW hyper-parameters and the schedule."""
        _require(self.name == "adamw", "optim.name", self.name, "'adamw'")
        _require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", self.lr, "a finite number > 0")
        _require(
            0 <= self.min_lr_ratio <= 1,
            "optim.min_lr_ratio",
            self.min_lr_ratio,
            "a ratio in [0, 1]",
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "a number in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "a number in [0, 1)")
        _require(self.eps > 0, "optim.eps", self.eps, "a number > 0")
        _require(
            self.clip_grad >= 0, "optim.clip_grad", self.clip_grad, "a number >= 0 (0 disables)"
        )
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(
            self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {list(SCHEDULES)}"
        )


@dataclass
class TrainerConfig:
    """Loop, batch and parallel layout. global batch = micro batch x accumulation x DP size."""

    steps: int = 1000
    micro_batch_size: int = 16
    global_batch_size: int = 16
    seq_length: int = 256
    eval_interval: int = 250
    # Global batches of validation sequences per evaluation (per set): the same sequences on
    # every layout (micro batch, DP, TP, PP, EP sizes), docs/evaluation.md.
    eval_iters: int = 20
    log_interval: int = 25
    seed: int = 1234
    run_dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    expert_parallel_size: int = 1
    # Attention and dense layers split over TP ranks (with sequence parallelism), layers over PP
    # stages (1F1B); experts stay whole (expert tensor parallel 1: a split expert's top-K would
    # need a cross-rank top-K). data parallel = world / (TP x PP).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1  # 1 only (docs/launching.md: why)
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when present; see DEVICES)
    backend: Optional[str] = None  # torch.distributed backend; null: nccl with CUDA, else gloo
    init_timeout_s: float = 600.0  # how long ranks wait for each other at start-up
    collective_timeout_s: float = 1800.0  # a collective that takes longer fails the job
    # A rank without progress this long dumps its stacks and exits (mone_train/components/watchdog.py):
    # null: automatic (20 median steps, at least 120 s; 900 s before steps are measured); 0: off.
    hang_timeout_s: Optional[float] = None
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights and optimizer)
    # ZeRO-1: each weight's optimizer state (and fp32 master) on one data-parallel rank only
    # (expert weights: one expert-data-parallel rank); nothing changes on one process.
    shard_optimizer: bool = False
    save_interval: int = 0  # steps between checkpoints; 0: none (SIGTERM/SIGUSR1 still save)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a save
    async_save: bool = True  # write checkpoints while training goes on (preemption: at once)
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir | none | <path>
    # A fresh run starts from these weights (a mone-import folder, or any run or checkpoint of
    # the same shape): new optimizer, step 0; the keep ratio and balance may differ.
    init_from: Optional[str] = None
    force_resume: bool = False  # resume although run_dir's config.yaml has another model shape
    max_nonfinite_steps: int = 3  # skipped (non-finite) updates in a row before the run stops
    compile: Optional[bool] = None  # megatron jit_fuser (torch.compile); null: on with CUDA only
    num_threads: Optional[int] = None  # intra-op threads; null: cores / processes per machine
    # Activation recompute: none | moe (recompute each MoE layer in backward) | full (every
    # transformer layer, one per checkpoint). Costs one more forward of what it recomputes.
    recompute: str = "none"

    def validate(self) -> None:
        """Loop lengths, batch arithmetic, layout and run-control values."""
        _require_positive(
            "trainer",
            self,
            (
                "steps",
                "micro_batch_size",
                "global_batch_size",
                "seq_length",
                "eval_interval",
                "eval_iters",
                "log_interval",
                "expert_parallel_size",
                "max_nonfinite_steps",
            ),
        )
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "trainer.global_batch_size",
            self.global_batch_size,
            f"a multiple of trainer.micro_batch_size={self.micro_batch_size}",
        )
        _require(
            self.precision in PRECISIONS,
            "trainer.precision",
            self.precision,
            f"one of {list(PRECISIONS)}",
        )
        _require(
            self.recompute in RECOMPUTE,
            "trainer.recompute",
            self.recompute,
            f"one of {list(RECOMPUTE)}",
        )
        if self.num_threads is not None:
            _require(
                self.num_threads >= 1,
                "trainer.num_threads",
                self.num_threads,
                "null or an integer >= 1",
            )
        _require_positive("trainer", self, ("tensor_parallel_size", "pipeline_parallel_size"))
        _require(
            self.expert_tensor_parallel_size == 1,
            "trainer.expert_tensor_parallel_size",
            self.expert_tensor_parallel_size,
            "1: experts stay whole (a tensor-split expert holds part of each neuron's row, and "
            "a token's top-K over its F neurons would need a top-K across ranks)",
        )
        _require(self.device in DEVICES, "trainer.device", self.device,
                 f"one of {list(DEVICES)}")  # fmt: skip
        if self.backend is not None:
            _require(
                self.backend in BACKENDS,
                "trainer.backend",
                self.backend,
                f"null or one of {list(BACKENDS)}",
            )
        _require(
            self.init_timeout_s > 0,
            "trainer.init_timeout_s",
            self.init_timeout_s,
            "a number of seconds > 0",
        )
        _require(self.collective_timeout_s > 0, "trainer.collective_timeout_s",
                 self.collective_timeout_s, "a number of seconds > 0")  # fmt: skip
        if self.hang_timeout_s is not None:
            _require(self.hang_timeout_s >= 0, "trainer.hang_timeout_s", self.hang_timeout_s,
                     "null (automatic), 0 (off) or a number of seconds > 0")  # fmt: skip


@dataclass
class LoggingConfig:
    """Where metrics go: terminal and ``metrics.jsonl`` always, wandb by ``wandb_mode``."""

    wandb_mode: str = "offline"
    wandb_project: str = "mone-train"
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: list[str] = field(default_factory=list)
    wandb_dir: Optional[str] = (
        None  # wandb writes <wandb_dir>/wandb/; null: WANDB_DIR, else run dir
    )
    health_metrics: bool = True  # expert load, neuron utilisation, |SiLU(gate)| quantiles
    peak_tflops: Optional[float] = None  # for the GPU MFU estimate; null: known devices only

    def validate(self) -> None:
        """The wandb mode."""
        _require(
            self.wandb_mode in WANDB_MODES,
            "logging.wandb_mode",
            self.wandb_mode,
            f"one of {list(WANDB_MODES)}",
        )


@dataclass
class EvaluationConfig:
    """What each evaluation measures (docs/evaluation.md). Every evaluation reads the same
    ``trainer.eval_iters`` global batches of sequences from each validation set, whatever the
    layout; the data's own validation split is the set ``valid``."""

    # More validation sets: name -> a dataset prefix (mone-preprocess output) or a list of
    # prefixes (blended in proportion to their sizes); all of each is validation data.
    sets: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # task JSONL files (docs/evaluation.md)
    # The built-in task of the stdlib corpus (real vs shuffled continuation of held-out files):
    # this many examples; 0: none.
    stdlib_task_examples: int = 0
    # Evaluate the same weights at these keep ratios too (MoNE: the experts' K changes).
    keep_ratios: list[float] = field(default_factory=list)
    task_micro_batch_size: Optional[int] = None  # task rows per forward; null: the trainer's

    def validate(self) -> None:
        """Set names, task files' suffix, keep ratios in (0, 1], sizes."""
        for name, source in self.sets.items():
            _require(bool(SET_NAME.fullmatch(str(name))), "evaluation.sets", name,
                     "names of letters, digits, '_', '-' or '.'")  # fmt: skip
            prefixes = [source] if isinstance(source, str) else list(source or [])
            _require(bool(prefixes) and all(isinstance(p, str) and p for p in prefixes),
                     f"evaluation.sets.{name}", source,
                     "a dataset prefix or a list of them")  # fmt: skip
        _require("valid" not in self.sets, "evaluation.sets.valid", self.sets.get("valid"),
                 "another name ('valid' is the data's own validation split)")  # fmt: skip
        for ratio in self.keep_ratios:
            _require(0.0 < ratio <= 1.0, "evaluation.keep_ratios", list(self.keep_ratios),
                     "ratios in (0, 1]")  # fmt: skip
        _require(self.stdlib_task_examples >= 0, "evaluation.stdlib_task_examples",
                 self.stdlib_task_examples, "an integer >= 0")  # fmt: skip
        if self.task_micro_batch_size is not None:
            _require(self.task_micro_batch_size >= 1, "evaluation.task_micro_batch_size",
                     self.task_micro_batch_size, "null or an integer >= 1")  # fmt: skip


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Every section, then the rules that span sections; raise ConfigError on the first.

        ``world_size`` (when known) enables the batch check that depends on it; whether EP
        divides the world size is checked when the process groups form.
        """
        sections = (self.model, self.moe, self.data, self.optim, self.trainer, self.logging,
                    self.evaluation)  # fmt: skip
        for section in sections:
            section.validate()
        m, t = self.model, self.trainer
        _require(
            t.seq_length <= m.max_position_embeddings,
            "trainer.seq_length",
            t.seq_length,
            f"at most model.max_position_embeddings={m.max_position_embeddings}",
        )
        _require(
            m.num_experts % t.expert_parallel_size == 0,
            "model.num_experts",
            m.num_experts,
            f"a multiple of trainer.expert_parallel_size={t.expert_parallel_size}",
        )
        self._validate_model_parallel()
        if world_size is not None:
            self.validate_layout(world_size)

    def _validate_model_parallel(self) -> None:
        """What tensor and pipeline parallelism need of the model."""
        m, t = self.model, self.trainer
        tp, pp = t.tensor_parallel_size, t.pipeline_parallel_size
        if tp > 1:
            groups = m.num_query_groups or m.num_attention_heads
            for key, value in (("model.num_attention_heads", m.num_attention_heads),
                               ("model.num_query_groups", groups),
                               ("model.hidden_size", m.hidden_size),
                               ("model.ffn_hidden_size", m.ffn_hidden_size)):  # fmt: skip
                _require(value % tp == 0, key, value,
                         f"a multiple of trainer.tensor_parallel_size={tp}")  # fmt: skip
            if m.shared_expert_ffn_hidden_size:
                _require(m.shared_expert_ffn_hidden_size % tp == 0,
                         "model.shared_expert_ffn_hidden_size", m.shared_expert_ffn_hidden_size,
                         f"a multiple of trainer.tensor_parallel_size={tp}")  # fmt: skip
            _require(t.seq_length % tp == 0, "trainer.seq_length", t.seq_length,
                     f"a multiple of trainer.tensor_parallel_size={tp} (sequence parallelism "
                     "splits every sequence over the tensor-parallel ranks)")  # fmt: skip
            _require(m.norm == "fused", "model.norm", m.norm,
                     "fused with tensor parallelism (megatron's torch norm has no sequence "
                     "parallelism)")  # fmt: skip
            _require(m.qk_layernorm != "full", "model.qk_layernorm", "full",
                     "none or head with tensor parallelism (a norm over all heads would need "
                     "the heads of every tensor-parallel rank)")  # fmt: skip
            _require(not self.moe.shared_expert_mone, "moe.shared_expert_mone", True,
                     "false with tensor parallelism (a tensor-split shared expert holds part of "
                     "each token's neurons: its top-K would cross ranks)")  # fmt: skip
        if pp > 1:
            # equal stages: none is empty, so the last holds decoder layers before the
            # multi-token prediction block megatron puts there (with its embedding copy)
            _require(m.num_layers % pp == 0, "trainer.pipeline_parallel_size", pp,
                     f"a divisor of model.num_layers={m.num_layers} (equal stages)")  # fmt: skip
            _require(not m.tie_embeddings, "model.tie_embeddings", True,
                     "false with pipeline parallelism (the first and last stages hold the "
                     "embedding and the output layer apart)")  # fmt: skip

    def validate_layout(self, world_size: int) -> None:
        """The job's layout: world = TP x PP x data parallel (attention and dense layers) =
        EP x PP x expert data parallel (experts), and the batch splits over data parallel."""
        t = self.trainer
        tp, pp, ep = t.tensor_parallel_size, t.pipeline_parallel_size, t.expert_parallel_size
        problem = layout_problem(world_size, tp, pp, ep)
        if problem:
            raise ConfigError(problem)
        per_step = t.micro_batch_size * (world_size // (tp * pp))
        _require(
            t.global_batch_size % per_step == 0,
            "trainer.global_batch_size",
            t.global_batch_size,
            f"a multiple of micro_batch_size x data-parallel size = {per_step}",
        )


def layout_problem(world_size: int, tp: int = 1, pp: int = 1, ep: int = 1) -> str | None:
    """Why TP, PP and EP do not fit ``world_size`` processes (one line), or None.

    Attention and dense layers fold the world into TP x PP x data parallel, experts into
    EP x PP x expert data parallel: both products must divide it (not TP x PP x EP: the experts
    reuse the ranks that split attention).
    """
    for names, size in ((("expert_parallel_size", "pipeline_parallel_size"), (ep, pp)),
                        (("tensor_parallel_size", "pipeline_parallel_size"), (tp, pp))):  # fmt: skip
        product = size[0] * size[1]
        if world_size % product:
            what = (f"trainer.{names[0]}={size[0]}" if size[1] == 1
                    else f"trainer.{names[0]} x {names[1]} = {product}")  # fmt: skip
            return (
                f"{what} is invalid: expected a divisor of the world size {world_size} "
                f"(world = TP x PP x data parallel = EP x PP x expert data parallel; "
                f"TP={tp}, PP={pp}, EP={ep})"
            )
    return None


def model_vocab_size(cfg: Config, tokenizer_vocab: int) -> int:
    """The model's vocabulary: ``model.vocab_size``, or the tokenizer's padded up to a multiple
    of the tensor-parallel size (the embedding and output rows split over TP)."""
    tp = cfg.trainer.tensor_parallel_size
    vocab_size = cfg.model.vocab_size
    if vocab_size is None:
        return -(-tokenizer_vocab // tp) * tp
    if vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); use null to take the tokenizer's"
        )
    if vocab_size % tp:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is invalid: expected a multiple of "
            f"trainer.tensor_parallel_size={tp} (e.g. {-(-vocab_size // tp) * tp}), or null"
        )
    return vocab_size


def one_process_layout(cfg: Config) -> Config:
    """``cfg`` set to run on one process (TP = PP = EP = 1), as the tools that rebuild a trained
    model do (export, generation, analysis): dist_checkpointing reshards any saved layout."""
    t = cfg.trainer
    t.expert_parallel_size = t.tensor_parallel_size = t.pipeline_parallel_size = 1
    return cfg


SCHEMA_NAME = "mone_train_schema"


def _multiply(a: int, b: int) -> int:
    return int(a) * int(b)


def _split(total: int, parts: int) -> int:
    """``total / parts`` when exact: the neurons of an expert split into ``parts`` experts."""
    total, parts = int(total), int(parts)
    if parts < 1 or total % parts:
        raise ConfigError(
            f"{total} does not split into model.expert_granularity={parts} equal parts "
            "(choose a granularity that divides the size's moe_ffn_hidden_size)"
        )
    return total // parts


def register_configs() -> None:
    """Register the schema that ``configs/config.yaml`` lists first in its defaults, the
    families' ``arch`` options, and the resolvers the size configs use (``mul``, ``div``)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from mone_train.families import register_arch_configs

    OmegaConf.register_new_resolver("mul", _multiply, replace=True)
    OmegaConf.register_new_resolver("div", _split, replace=True)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    register_arch_configs()


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check the meaning of every value (see :meth:`Config.validate`)."""
    cfg.validate(world_size)
