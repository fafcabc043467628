"""``mone-plan``: memory, expert-parallel traffic and FLOPs of a run, before it starts.

Takes the same Hydra config and overrides as ``mone-train`` plus the job's shape
(``--world-size``, ``--gpu-memory-gib``) and prints, per device:

- parameters, gradients (megatron DDP's fp32 ``main_grad`` buffers) and optimizer state
  (AdamW's two fp32 moments; fp32 master weights when parameters are bf16). These are exact:
  counted from the same shapes megatron-core builds, per tensor-parallel slice and pipeline
  stage (tests compare them with built models, rank by rank).
- activations of one micro batch with each ``trainer.recompute`` setting: an analytic count of
  the tensors autograd keeps per layer (attention, router and dispatch, experts, MoNE's mask)
  and of the loss (logits and the fp32 cross-entropy), plus what is alive at the peak (the
  logits at the end of the forward, or one recomputed layer in backward). An estimate: checked
  against a measured CPU peak by ``benchmarks/memory_plan_check.py`` (target within 25 %).
- the all-to-all bytes of a step (expert parallelism), FLOPs per token and the tokens/s that an
  MFU implies; whether the total fits and, when not, which knob makes it fit.

Tensor parallelism TP (with sequence parallelism) splits the attention and dense weights and,
per rank, the activations (a rank keeps 1/TP of the positions between blocks and 1/TP of the
heads inside attention; its experts see its own positions). Pipeline parallelism PP gives each
stage num_layers / PP layers (the embedding on the first, the output layer on the last) and,
under 1F1B, stage s holds min(PP - s, micro batches) micro batches in flight: the plan is that
of the fullest stage.

Multi-head latent attention and multi-token prediction (``arch=deepseek_v3``) are counted the
same ways: MLA's weights per tensor-parallel rank (the latent down-projections whole), what it
keeps (the latents and the per-head query, key and value of the core) and its FLOPs over its
own head sizes; the MTP layers on the last stage with their copy of the embedding (when that
stage is not the first), their activations and second cross-entropy, and their FLOPs (a layer
each, and the output layer again).

Legend: L layers, h hidden size, a attention heads, g query groups, d head size, V vocabulary,
E experts (E_loc on one device), k router top-k, F neurons per expert, K kept neurons,
b micro batch, s sequence length, T = b*s tokens, N = T*k routed rows, p bytes per element,
t tensor-parallel size, T_t = T/t the positions a tensor-parallel rank keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mone_kernels.rules import num_kept_neurons
from mone_train.config import Config, model_vocab_size
from mone_train.errors import ConfigError
from mone_train.hardware import DEFAULT_GPU, GIB, GPUS

FP32 = 4
# Bytes per parameter: (weights, gradient buffer, optimizer state). bf16 weights keep fp32
# masters (4) beside AdamW's two fp32 moments (8); gradients are reduced in fp32 either way.
PRECISION_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 4, 12)}
RECOMPUTE_SETTINGS = ("none", "moe", "full")


@dataclass(frozen=True)
class Shape:
    """The numbers the estimates need, taken from a Config and a vocabulary size."""

    num_layers: int
    num_moe_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    experts: int
    local_experts: int
    topk: int
    neurons: int
    kept: int
    tied: bool
    micro_batch: int
    seq: int
    bytes_per_act: int
    grouped: bool  # experts as grouped GEMMs (their weights stacked per forward)
    packed_mask: bool  # MoNE's Triton path (1-bit mask); the reference keeps a bool mask
    cpu_mone_kernel: bool  # MoNE's fused CPU operator (the router probability applied inside)
    fused_norm: bool  # our RMSNorm's CPU operator (keeps the fp32 input and rstd only)
    balance: bool  # NG-LBL statistics are kept for backward
    megatron_experts: bool  # megatron's SequentialMLP (plain MoE, not grouped)
    sdpa: bool
    dropout: bool
    shared: int = 0  # shared expert width S (0: none)
    shared_gate: bool = False
    shared_kept: int = 0  # K of a MoNE shared expert (S: dense)
    qk_norm: str = "none"  # none | head | full
    qkv_bias: bool = False
    tp: int = 1  # tensor parallel (with sequence parallelism)
    pp: int = 1  # pipeline stages
    moe_pattern: tuple[int, ...] = ()  # 1 for a MoE layer, per layer (empty: all MoE)
    mtp_layers: int = 0  # multi-token prediction layers (on the last stage), each like the last
    # Multi-head latent attention (kv_lora 0: none): the query latent (0: full-rank queries),
    # the key/value latent, per head the query/key part without and with RoPE, the value size
    q_lora: int = 0
    kv_lora: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_dim: int = 0
    # torch's CPU SDPA has no fused kernel for MLA's unequal query/key and value head sizes:
    # its math path keeps the softmax (and scaled copies of q and k)
    mla_math_core: bool = False

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq

    @property
    def mtp_moe_layers(self) -> int:
        """Multi-token prediction layers that are MoE (each is built like the last layer)."""
        return self.mtp_layers if (list(self.moe_pattern) or [1])[-1] else 0

    @property
    def sp_tokens(self) -> int:
        """Positions a tensor-parallel rank keeps between blocks (sequence parallelism)."""
        return self.tokens // self.tp


@dataclass(frozen=True)
class StageLayers:
    """The layers one device runs: a pipeline stage (or the whole model)."""

    index: int
    layers: int
    moe_layers: int
    first: bool  # holds the embedding
    last: bool  # holds the final norm, the output layer and the loss


def stage_layers(shape: Shape) -> list[StageLayers]:
    """Equal stages of ``num_layers / pp`` consecutive layers (megatron's default split)."""
    pattern = list(shape.moe_pattern) or [1] * shape.num_layers
    per = shape.num_layers // shape.pp
    return [
        StageLayers(s, per, sum(pattern[s * per : (s + 1) * per]), s == 0, s == shape.pp - 1)
        for s in range(shape.pp)
    ]


def whole_model_stage(shape: Shape) -> StageLayers:
    return StageLayers(0, shape.num_layers, shape.num_moe_layers, True, True)


def shape_of(
    cfg: Config, vocab_size: int, ep_size: int | None = None, device: str = "cuda"
) -> Shape:
    """:class:`Shape` of ``cfg`` on ``device`` ("cuda" or "cpu": which MoNE kernel runs);
    ``ep_size`` defaults to trainer.expert_parallel_size."""
    m, t, moe = cfg.model, cfg.trainer, cfg.moe
    ep = ep_size or t.expert_parallel_size
    mone = moe.flavour == "mone"
    kept = num_kept_neurons(moe.neuron_keep_ratio if mone else 1.0, m.moe_ffn_hidden_size)
    sparse = kept < m.moe_ffn_hidden_size
    triton = moe.kernel_impl == "triton" or (moe.kernel_impl == "auto" and device == "cuda")
    cpu = device == "cpu"
    grouped = moe.grouped_on(device)
    shared = m.shared_expert_ffn_hidden_size
    shared_mone = mone and moe.shared_expert_mone and shared
    unequal_heads = m.qk_head_dim + m.qk_pos_emb_head_dim != m.v_head_dim
    return Shape(
        num_layers=m.num_layers,
        num_moe_layers=sum(m.moe_layer_pattern()),
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        groups=m.num_query_groups or m.num_attention_heads,
        head_dim=m.attention_head_dim(),
        ffn=m.ffn_hidden_size,
        vocab=model_vocab_size(cfg, vocab_size),
        experts=m.num_experts,
        local_experts=m.num_experts // ep,
        topk=m.router_topk,
        neurons=m.moe_ffn_hidden_size,
        kept=kept,
        tied=m.tie_embeddings,
        micro_batch=t.micro_batch_size,
        seq=t.seq_length,
        bytes_per_act=PRECISION_BYTES[t.precision][0],
        grouped=grouped,
        packed_mask=sparse and triton,
        cpu_mone_kernel=sparse and cpu and moe.kernel_impl in ("auto", "cpu"),
        fused_norm=cpu and m.norm == "fused",
        balance=mone and sparse and moe.ng_lbl_coeff > 0,
        megatron_experts=not mone and not grouped,
        sdpa=m.attention == "sdpa",
        dropout=m.dropout > 0,
        shared=shared,
        shared_gate=m.shared_expert_gate,
        shared_kept=num_kept_neurons(moe.neuron_keep_ratio, shared) if shared_mone else shared,
        qk_norm=m.qk_layernorm,
        qkv_bias=m.qkv_bias,
        tp=t.tensor_parallel_size,
        pp=t.pipeline_parallel_size,
        moe_pattern=tuple(m.moe_layer_pattern()),
        mtp_layers=m.mtp_num_layers,
        **_mla_shape(m),
        mla_math_core=cpu and m.multi_latent_attention and unequal_heads,
    )


def _mla_shape(m) -> dict:
    """The multi-head latent attention fields of :class:`Shape` (none without MLA)."""
    if not m.multi_latent_attention:
        return {}
    return {"q_lora": m.q_lora_rank or 0, "kv_lora": m.kv_lora_rank, "qk_nope": m.qk_head_dim,
            "qk_rope": m.qk_pos_emb_head_dim, "v_dim": m.v_head_dim}  # fmt: skip


# --------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class ParamNumbers:
    """Parameter counts: per expert-parallel rank (``dense + expert_local``) and model-wide."""

    dense: int  # everything but the routed experts (replicated on every rank)
    expert_local: int  # routed-expert weights on one rank
    expert_total: int

    @property
    def local(self) -> int:
        return self.dense + self.expert_local

    @property
    def total(self) -> int:
        return self.dense + self.expert_total


def parameter_numbers(shape: Shape, stage: StageLayers | None = None) -> ParamNumbers:
    """Parameters of megatron-core's GPTModel as built by ``mone_train.model.builder``:
    RMSNorm weights, bias-free linears (but the q/k/v biases of ``qkv_bias``), fused QKV with
    grouped queries, QK-norm weights per head or over all heads, rotary positions; a MoE layer
    has its router, its routed experts and its shared expert (and the shared expert's gate).

    Without ``stage``: the whole model (``dense`` unsplit). With a pipeline ``stage``: what one
    device of that stage holds, its tensor-parallel slices (QKV rows, the attention output's
    columns, dense and shared-expert MLPs, embedding and output rows divide by t; norms,
    routers, the shared expert's gate and head-wise QK-norms stay whole) and its local experts.
    """
    h, d = shape.hidden, shape.head_dim
    t = 1 if stage is None else shape.tp
    stage = stage or whole_model_stage(shape)
    if shape.kv_lora:
        attention = 2 * h + mla_parameters(shape, t)
    else:
        qkv_rows = (shape.heads + 2 * shape.groups) * d
        attention = 2 * h + (qkv_rows * h + h * shape.heads * d) // t
        attention += qkv_rows // t if shape.qkv_bias else 0
        qk_norm = {"none": 0, "head": 2 * d, "full": (shape.heads + shape.groups) * d}
        attention += qk_norm[shape.qk_norm]
    # per MoE layer, replicated on every expert-parallel rank: the router and shared expert
    moe_replicated = shape.experts * h + 3 * shape.shared * h // t + (h if shape.shared_gate else 0)
    dense_mlp = 3 * shape.ffn * h // t  # gated: fc1 [2 ffn, h], fc2 [h, ffn]
    one_expert = 3 * shape.neurons * h  # fc1 [2F, h], fc2 [h, F]
    num_dense_layers = stage.layers - stage.moe_layers
    table = shape.vocab * h // t  # the embedding, or the output layer
    embeddings = table if stage.first else 0
    if stage.last:
        embeddings += h + (0 if shape.tied else table)  # final norm, output layer
    dense = (
        embeddings
        + stage.layers * attention
        + stage.moe_layers * moe_replicated
        + num_dense_layers * dense_mlp
    )
    # multi-token prediction on the last stage: per layer two input norms, the projection of
    # both [h, 2h] (column-split), a layer like the last decoder layer and a final norm; its
    # own copy of the embedding when the first stage is elsewhere
    mtp_moe = shape.mtp_moe_layers
    mtp = 3 * h + 2 * h * h // t + attention
    mtp += moe_replicated if mtp_moe else dense_mlp
    if stage.last and shape.mtp_layers:
        dense += shape.mtp_layers * mtp + (0 if stage.first else table)
    return ParamNumbers(
        dense=dense,
        expert_local=(stage.moe_layers + (mtp_moe if stage.last else 0))
        * shape.local_experts
        * one_expert,
        expert_total=(shape.num_moe_layers + mtp_moe) * shape.experts * one_expert,
    )


def mla_parameters(shape: Shape, t: int = 1) -> int:
    """Weights of one multi-head latent attention block (megatron's ``MLASelfAttention``) on a
    tensor-parallel rank: the latent down-projections and norms (whole on every rank:
    ``model/builder.py``), the per-head up-projections and the output projection (split by
    heads)."""
    h, a = shape.hidden, shape.heads
    q_rows = a * (shape.qk_nope + shape.qk_rope)
    if shape.q_lora:  # down [q_lora, h], norm [q_lora], up [a (nope + rope), q_lora]
        query = shape.q_lora * h + q_rows * shape.q_lora // t + shape.q_lora
    else:  # one projection [a (nope + rope), h]
        query = q_rows * h // t
    kv_down = (shape.kv_lora + shape.qk_rope) * h  # the latent and the shared RoPE key
    kv_up = a * (shape.qk_nope + shape.v_dim) * shape.kv_lora // t
    out = h * a * shape.v_dim // t
    return query + kv_down + shape.kv_lora + kv_up + out


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes per device that do not depend on the batch."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state_bytes(
    shape: Shape,
    precision: str,
    dense_dp: int = 1,
    expert_dp: int = 1,
    stage: StageLayers | None = None,
) -> ModelStateBytes:
    """Weights, fp32 gradient buffers and optimizer state of one device (of pipeline ``stage``,
    by default the first); with a sharded optimizer (ZeRO-1) the state of dense weights divides
    by the data-parallel size ``dense_dp`` and that of expert weights by the
    expert-data-parallel size ``expert_dp`` (whole weights are assigned, so a rank's share is
    this up to one weight's rounding)."""
    weight, grad, optimizer = PRECISION_BYTES[precision]
    numbers = parameter_numbers(shape, stage or stage_layers(shape)[0])
    state = optimizer * (numbers.dense / dense_dp + numbers.expert_local / expert_dp)
    return ModelStateBytes(
        params=weight * numbers.local, grads=grad * numbers.local, optimizer=math.ceil(state)
    )


# ---------------------------------------------------------------------------- activations


def norm_bytes(shape: Shape) -> int:
    """What one RMSNorm keeps for backward (of a rank's positions)."""
    T, h, p = shape.sp_tokens, shape.hidden, shape.bytes_per_act
    if shape.fused_norm:  # our CPU operator: the fp32 input (x itself when fp32) and rstd
        return T * h * FP32 + T * FP32
    return 2 * T * h * p + T * FP32  # torch's RMSNorm keeps x and x * rstd, and rstd


def attention_bytes(shape: Shape) -> int:
    """What one self-attention block keeps for backward (its input norm included). Under
    tensor parallelism a rank holds a/t heads of every position, and its QKV layer keeps its
    own positions' input (the sequence-parallel gather is redone in backward)."""
    if shape.kv_lora:
        return mla_attention_bytes(shape)
    T, h, p, d = shape.tokens, shape.hidden, shape.bytes_per_act, shape.head_dim
    heads, groups = shape.heads // shape.tp, shape.groups // shape.tp
    norm = norm_bytes(shape)
    qkv_in = shape.sp_tokens * h * p
    qkv_out = T * (heads + 2 * groups) * d * p  # v is a view: the whole storage stays
    q_k_rope = T * (heads + groups) * d * p  # RoPE's outputs, kept by the core
    out = T * h * p // shape.tp  # also linear_proj's input (a view)
    if shape.sdpa:  # flash / memory-efficient kernels: the output and a logsumexp per row
        core = out + shape.micro_batch * heads * shape.seq * FP32
    else:  # megatron's DotProductAttention keeps the [b, a, s, s] softmax (and dropout mask)
        scores = shape.micro_batch * heads * shape.seq * shape.seq
        expanded_kv = 2 * T * h * p // shape.tp if shape.groups < shape.heads else 0
        core = out + scores * p + (scores if shape.dropout else 0) + expanded_kv
    qk_norm = 0
    if shape.qk_norm != "none":  # each norm keeps its input and the normalised values
        qk_norm = 2 * T * (heads + groups) * d * p
    return norm + qkv_in + qkv_out + qk_norm + q_k_rope + core


def mla_attention_bytes(shape: Shape) -> int:
    """What one multi-head latent attention block keeps for backward (an estimate, SDPA core):
    its input norm and input; the compressed query and key/value latents (each norm's input
    and output); RoPE's cos and sin (fp32, for queries and keys); per head of this rank the
    contiguous query, key and value the core reads, the core's output and logsumexp (on CPU,
    where SDPA runs its math path for unequal head sizes: the [b, a/t, s, s] softmax and its
    scaled query and transposed key instead of the logsumexp). The up-projections' outputs
    are not kept: RoPE and the concatenations that consume them need nothing of them in
    backward (checked tensor by tensor: tests/test_deepseek_v3.py)."""
    T, Tsp, p, a = shape.tokens, shape.sp_tokens, shape.bytes_per_act, shape.heads // shape.tp
    qk = shape.qk_nope + shape.qk_rope
    latents = 2 * Tsp * (shape.q_lora + shape.kv_lora) * p
    rope = 4 * shape.seq * shape.qk_rope * FP32
    core_in = T * a * (2 * qk + shape.v_dim) * p
    core = T * a * shape.v_dim * p + shape.micro_batch * a * shape.seq * FP32
    if shape.mla_math_core:
        softmax = shape.micro_batch * a * shape.seq * shape.seq * p
        core = T * a * shape.v_dim * p + softmax + 2 * T * a * qk * p
    return norm_bytes(shape) + Tsp * shape.hidden * p + latents + rope + core_in + core


def moe_layer_bytes(shape: Shape) -> dict[str, int]:
    """What one MoE layer keeps for backward, by part (its pre-MLP norm included). A
    tensor-parallel rank routes its own positions (experts are never split); the shared expert
    gathers every position and holds S/t of its neurons."""
    T, h, p, E, k = shape.sp_tokens, shape.hidden, shape.bytes_per_act, shape.experts, shape.topk
    N, F = T * k, shape.neurons
    router = T * h * p + T * (E * FP32 + k * (2 * 8 + FP32))  # input; scores, top-k, probs
    dispatch = T * E * (1 + FP32) + N * 8  # routing map, probs per expert, permutation indices
    experts = N * h * p + N * 2 * F * p  # fc1 input, fc1 output
    if shape.megatron_experts:  # SwiGLU keeps SiLU(gate); the scaled product feeds fc2
        experts += 3 * N * F * p
        mask = 0
    else:  # h and h * prob (the CPU operator: h * prob only); a bool mask, Triton's 1 bit
        experts += (1 if shape.cpu_mone_kernel else 2) * N * F * p
        mask = N * math.ceil(F / 8) if shape.packed_mask else N * F
        if shape.balance:  # per-row sums and shares (+ the row's expert), per-expert counts
            rows = 3 if shape.packed_mask else 2
            mask += rows * N * FP32 + shape.local_experts * F * FP32
    if shape.grouped:  # torch.stack of the local experts' fc1 and fc2 weights, every forward
        experts += shape.local_experts * 3 * F * h * p
    S = shape.shared  # the shared expert sees the router's input: its fc1 output, SwiGLU's
    shared = shape.tokens * 3 * S * p // shape.tp if S else 0  # product; the gate's score, output
    shared += T * (h * p + FP32) if shape.shared_gate else 0
    shared += T * S if shape.shared_kept < S else 0  # a MoNE shared expert's bool mask
    return {
        "norm": norm_bytes(shape),
        "router": router,
        "dispatch": dispatch,
        "experts": experts,
        "mone_mask": mask,
        "shared_expert": shared,
    }


def moe_backward_bytes(shape: Shape) -> int:
    """Working memory of an MoE layer's backward at its largest: the gradients of the experts'
    fc1 output [N, 2F] and of their activation [N, F] (fp32 in the reference activation)."""
    N, F = shape.sp_tokens * shape.topk, shape.neurons
    grad_bytes = shape.bytes_per_act if shape.packed_mask else FP32
    return 3 * N * F * grad_bytes


def dense_mlp_bytes(shape: Shape) -> int:
    """A dense SwiGLU MLP layer (those that ``moe_layer_freq`` leaves dense), norm included."""
    T, h, p = shape.tokens, shape.hidden, shape.bytes_per_act
    return norm_bytes(shape) + shape.sp_tokens * h * p + T * shape.ffn * 4 * p // shape.tp


def mtp_layer_bytes(shape: Shape, recompute: str) -> int:
    """What one multi-token prediction layer (megatron's, on the last stage) keeps for
    backward (an estimate): its two input norms (of the shifted tokens' embedding and of the
    decoder's output), the projection's input [T_t, 2h], a layer like the last decoder layer
    (under ``trainer.recompute`` as those are), its final norm, its share of the hidden states
    it concatenates with the decoder's (the output layer's input) and a second cross-entropy
    (the fp32 softmax and labels). ``full`` recompute keeps only the layer's two inputs."""
    T, Tsp, h, p = shape.tokens, shape.sp_tokens, shape.hidden, shape.bytes_per_act
    head = Tsp * h * p + T * (shape.vocab // shape.tp) * FP32 + T
    if recompute == "full":
        return 2 * Tsp * h * p + head
    if shape.mtp_moe_layers:
        moe = moe_layer_bytes(shape)
        mlp = moe["norm"] + Tsp * h * p if recompute == "moe" else sum(moe.values())
    else:
        mlp = dense_mlp_bytes(shape)
    return 3 * norm_bytes(shape) + 2 * Tsp * h * p + attention_bytes(shape) + mlp + head


def _only_mtp(parts: dict[str, int]) -> dict[str, int]:
    return {"mtp": parts["mtp"]} if "mtp" in parts else {}


def loss_bytes(shape: Shape) -> tuple[int, int]:
    """(kept for backward, alive only at the end of the forward) by the final norm, the output
    layer and megatron's cross-entropy (its softmax in fp32)."""
    T, h, p, V = shape.tokens, shape.hidden, shape.bytes_per_act, shape.vocab // shape.tp
    kept = norm_bytes(shape) + shape.sp_tokens * h * p + T * V * FP32 + T
    logits = T * V * p + (T * V * FP32 if p < FP32 else 0)  # + the fp32 copy of bf16 logits
    return kept, logits


@dataclass(frozen=True)
class ActivationBytes:
    """One micro batch: kept for backward (by part, all layers) and the peak estimate."""

    parts: dict[str, int]
    peak: int

    @property
    def kept(self) -> int:
        return sum(self.parts.values())


def activation_bytes(
    shape: Shape, recompute: str, stage: StageLayers | None = None, in_flight: int = 1
) -> ActivationBytes:
    """Activation memory of a device's forward + backward under ``recompute``: one micro batch
    through the whole model, or through pipeline ``stage`` with ``in_flight`` micro batches
    alive at once (1F1B: ``min(pp - stage, micro batches)``).

    Without recompute everything below is kept; ``moe`` keeps only each MoE layer's input and
    recomputes one MoE layer at a time in backward; ``full`` keeps only each layer's input and
    recomputes one layer at a time. The peak is the larger of two moments: the end of
    the forward (everything kept, and the logits) and the backward of the last MoE layer (the
    loss's tensors freed; that layer recomputed, if it is, and its gradient working memory).
    With micro batches in flight, the others' kept tensors come on top (the parts are those of
    all of them).
    """
    h, p = shape.hidden, shape.bytes_per_act
    stage = stage or whole_model_stage(shape)
    moe = moe_layer_bytes(shape)
    moe_total = sum(moe.values())
    num_dense = stage.layers - stage.moe_layers
    layer_input = shape.sp_tokens * h * p
    parts = {
        "attention": stage.layers * attention_bytes(shape),
        "dense_mlp": num_dense * dense_mlp_bytes(shape),
        **{f"moe_{name}": stage.moe_layers * n for name, n in moe.items()},
    }
    kept_loss, logits = loss_bytes(shape) if stage.last else (0, 0)
    if stage.last and shape.mtp_layers:
        parts["mtp"] = shape.mtp_layers * mtp_layer_bytes(shape, recompute)
    recomputed = 0
    if recompute == "moe":
        parts = {k: v for k, v in parts.items() if not k.startswith("moe_")}
        parts["moe_norm"] = stage.moe_layers * moe["norm"]
        parts["moe_inputs"] = stage.moe_layers * layer_input
        recomputed = moe_total - moe["norm"] if stage.moe_layers else 0
    elif recompute == "full":
        biggest_mlp = moe_total if stage.moe_layers else dense_mlp_bytes(shape)
        recomputed = attention_bytes(shape) + biggest_mlp
        parts = {"layer_inputs": stage.layers * layer_input, **_only_mtp(parts)}
    parts = {k: v * in_flight for k, v in parts.items()}
    if kept_loss:
        parts["loss"] = kept_loss  # the last stage: one micro batch in flight
    kept = sum(parts.values())
    backward = recomputed + (moe_backward_bytes(shape) if stage.moe_layers else 0)
    peak = max(kept + logits, kept - kept_loss + backward)
    return ActivationBytes(parts=parts, peak=peak)


# ------------------------------------------------------------------ communication and FLOPs


def all_to_all_bytes(
    shape: Shape, ep_size: int, micro_batches: int, recompute: str, moe_layers: int | None = None
) -> int:
    """Bytes one device sends by all-to-all in a step (0 without expert parallelism).

    Per MoE layer (of its stage: ``moe_layers``) and micro batch the dispatcher sends T_t*k
    rows of h values (and a fp32 router probability each) to the experts and receives as many
    back, in the forward and again in backward; recomputing the MoE layer repeats its forward
    exchange. Of these bytes the share (EP - 1) / EP leaves the device; MoNE moves exactly what
    MoE moves, at any TP (experts are whole: no collective inside one).
    """
    if ep_size == 1:
        return 0
    N, p = shape.sp_tokens * shape.topk, shape.bytes_per_act
    dispatch, combine = N * (shape.hidden * p + FP32), N * shape.hidden * p
    passes = 3 if recompute in ("moe", "full") else 2  # forward, (recomputed forward,) backward
    layers = shape.num_moe_layers if moe_layers is None else moe_layers
    return layers * micro_batches * passes * (dispatch + combine)


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token (6 x weights touched + attention), three ways."""

    dense_equivalent: float  # every expert of every MoE layer
    executed: float  # top-k routing with whole experts: what the dense expert GEMMs compute
    mone_activated: float  # the neuron top-k: weights MoNE's selection touches


def flops_per_token(shape: Shape) -> FlopsPerToken:
    """FLOPs per token by ``health.training_flops_per_token`` (the trainer's MFU formula)."""
    from mone_train.components.health import model_flops_per_token

    numbers = parameter_numbers(shape)
    h, F, K = shape.hidden, shape.neurons, shape.kept
    # As the trainer's counts (model/params.py): dense weights, embeddings included, plus the
    # routed experts' weights that one token touches (multi-token prediction layers included).
    moe_layers = shape.num_moe_layers + shape.mtp_moe_layers
    per_layer_experts = moe_layers * shape.topk
    routed = numbers.dense + per_layer_experts * 3 * h * F
    mone = numbers.dense + per_layer_experts * (h * F + 2 * h * K)
    mone -= moe_layers * 2 * h * (shape.shared - shape.shared_kept)  # MoNE shared
    # (health.training_flops_per_token of the config: each MTP layer runs the output layer
    # again and counts as a layer; MLA's scores and values over its own head sizes)
    routed_again = shape.mtp_layers * shape.vocab * h
    width = shape.heads * (shape.qk_nope + shape.qk_rope + shape.v_dim) if shape.kv_lora else None

    def flops(params: int) -> float:
        layers = shape.num_layers + shape.mtp_layers
        return model_flops_per_token(params + routed_again, layers, h, shape.seq, width)

    return FlopsPerToken(flops(numbers.total), flops(routed), flops(mone))


def peak_tflops_of(gpu: str, precision: str) -> float:
    """Dense peak TFLOP/s of ``gpu`` (a :data:`mone_train.hardware.GPUS` name) for ``precision``
    (fp32 matmuls at the TF32 peak, as GPU training runs them)."""
    return GPUS[gpu].peak("bf16" if precision == "bf16" else "tf32")


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage's device: its layers, model states and activations."""

    layers: StageLayers
    in_flight: int  # micro batches alive at once under 1F1B
    states: ModelStateBytes
    activations: dict[str, ActivationBytes]  # by recompute setting
    a2a_bytes: int

    def total_bytes(self, recompute: str) -> int:
        return self.states.total + self.activations[recompute].peak


@dataclass(frozen=True)
class Plan:
    """Everything ``mone-plan`` prints, for one config on one job shape."""

    cfg: Config
    shape: Shape
    world_size: int
    ep_size: int
    micro_batches: int  # per device and optimizer step
    stages: list[StagePlan]  # one per pipeline stage
    flops: FlopsPerToken
    gpu: str
    peak_tflops: float
    mfu: float
    gpu_memory_bytes: int

    @property
    def recompute(self) -> str:
        return self.cfg.trainer.recompute

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.shape.tp * self.shape.pp)

    def fullest(self, recompute: str | None = None) -> StagePlan:
        """The stage whose device needs the most memory (the one that must fit)."""
        rc = recompute or self.recompute
        return max(self.stages, key=lambda stage: stage.total_bytes(rc))

    @property
    def states(self) -> ModelStateBytes:
        return self.fullest().states

    @property
    def activations(self) -> dict[str, ActivationBytes]:
        return self.fullest().activations

    @property
    def a2a_bytes(self) -> int:
        return max(stage.a2a_bytes for stage in self.stages)

    def total_bytes(self, recompute: str | None = None) -> int:
        """Model states plus the activation peak on the fullest stage's device."""
        rc = recompute or self.recompute
        return self.fullest(rc).total_bytes(rc)

    @property
    def fits(self) -> bool:
        return self.total_bytes() <= self.gpu_memory_bytes

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.mfu * self.peak_tflops * 1e12 / self.flops.executed


def make_plan(
    cfg: Config,
    vocab_size: int,
    world_size: int,
    gpu_memory_gib: float = 80.0,
    mfu: float = 0.4,
    gpu: str = DEFAULT_GPU,
    device: str = "cuda",
) -> Plan:
    """The plan of ``cfg`` on ``world_size`` devices of ``gpu_memory_gib`` each."""
    from mone_train.config import layout_problem

    t = cfg.trainer
    ep, tp, pp = t.expert_parallel_size, t.tensor_parallel_size, t.pipeline_parallel_size
    problem = layout_problem(world_size, tp, pp, ep)
    if problem:
        raise ConfigError(f"--world-size={world_size}: {problem}")
    cfg.validate(world_size=world_size)
    shape = shape_of(cfg, vocab_size, ep, device)
    dense_dp, expert_dp = world_size // (tp * pp), world_size // (ep * pp)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dense_dp)
    shards = (dense_dp, expert_dp) if t.shard_optimizer else ()
    stages = []
    for layers in stage_layers(shape):
        in_flight = min(pp - layers.index, micro_batches)
        stages.append(StagePlan(
            layers=layers,
            in_flight=in_flight,
            states=model_state_bytes(shape, t.precision, *shards, stage=layers),
            activations={rc: activation_bytes(shape, rc, layers, in_flight)
                         for rc in RECOMPUTE_SETTINGS},
            a2a_bytes=all_to_all_bytes(shape, ep, micro_batches, t.recompute, layers.moe_layers),
        ))  # fmt: skip
    return Plan(
        cfg=cfg,
        shape=shape,
        world_size=world_size,
        ep_size=ep,
        micro_batches=micro_batches,
        stages=stages,
        flops=flops_per_token(shape),
        gpu=gpu,
        peak_tflops=peak_tflops_of(gpu, t.precision),
        mfu=mfu,
        gpu_memory_bytes=int(gpu_memory_gib * GIB),
    )


def suggestions(plan: Plan, vocab_size: int) -> list[dict]:
    """Trainer settings that make a plan fit that does not: for each knob (recompute, micro
    batch, expert parallelism, optimizer sharding) its mildest setting that fits alone; if none does, the three
    turned together (full recompute, the widest expert parallelism, then the largest micro
    batch that fits). Each item maps trainer keys to values."""
    t = plan.cfg.trainer
    families = [
        [
            {"recompute": rc}
            for rc in RECOMPUTE_SETTINGS[RECOMPUTE_SETTINGS.index(t.recompute) + 1 :]
        ],
        [{"micro_batch_size": n} for n in _divisors_below(t.micro_batch_size)],
        [{"expert_parallel_size": ep} for ep in _wider_ep(plan)],
        [{"shard_optimizer": True}] if not t.shard_optimizer and plan.world_size > 1 else [],
    ]
    found = [next((c for c in family if _fits(plan, vocab_size, c)), None) for family in families]
    if any(found):
        return [c for c in found if c]
    combined = {"recompute": "full"}
    if families[2]:
        combined.update(families[2][-1])
    for micro in [t.micro_batch_size, *_divisors_below(t.micro_batch_size)]:
        if _fits(plan, vocab_size, {**combined, "micro_batch_size": micro}):
            return [{**combined, "micro_batch_size": micro}]
    return []


def _divisors_below(n: int) -> list[int]:
    return [d for d in range(n - 1, 0, -1) if n % d == 0]


def _wider_ep(plan: Plan) -> list[int]:
    pp = plan.shape.pp
    return [
        ep
        for ep in range(plan.ep_size + 1, plan.world_size + 1)
        if plan.world_size % (ep * pp) == 0 and plan.cfg.model.num_experts % ep == 0
    ]


def _fits(plan: Plan, vocab_size: int, trainer_values: dict) -> bool:
    cfg = replace(plan.cfg, trainer=replace(plan.cfg.trainer, **trainer_values))
    other = make_plan(cfg, vocab_size, plan.world_size, 1.0, plan.mfu, plan.gpu)
    return other.total_bytes() <= plan.gpu_memory_bytes


def _optimizer_label(precision: str, sharded: bool) -> str:
    what = "AdamW moments" if precision == "fp32" else "AdamW + fp32 masters"
    return f"{'optim. state' if sharded else 'optimizer state'} ({what}{', ZeRO-1' if sharded else ''})"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# ------------------------------------------------------------------------------ printing

PART_LABELS = {
    "attention": "attention (norm, QKV, RoPE, core)",
    "dense_mlp": "dense MLP layers",
    "moe_norm": "MoE pre-MLP norm",
    "moe_router": "MoE router",
    "moe_dispatch": "MoE dispatch (maps, indices)",
    "moe_experts": "experts (fc1 in/out, act, fc2 in)",
    "moe_mone_mask": "MoNE mask + NG-LBL stats",
    "moe_shared_expert": "shared expert (fc1 out, act, gate)",
    "moe_inputs": "MoE layer inputs (recompute)",
    "layer_inputs": "layer inputs (recompute)",
    "loss": "final norm, logits, fp32 cross-entropy",
    "mtp": "multi-token prediction (layer, 2nd loss)",
}


def format_plan(plan: Plan, vocab_size: int) -> str:
    """The plan as printed by ``mone-plan``."""
    cfg, shape, t = plan.cfg, plan.shape, plan.cfg.trainer
    numbers = parameter_numbers(shape)
    fullest = plan.fullest()
    local = parameter_numbers(shape, fullest.layers).local
    tp, pp = shape.tp, shape.pp
    layout = f"tensor parallel {tp} (sequence parallel), " if tp > 1 else ""
    layout += f"pipeline parallel {pp} (1F1B), " if pp > 1 else ""
    lines = [
        f"model {cfg.model.name}, {cfg.moe.flavour} (K = {shape.kept} of F = {shape.neurons} "
        f"neurons), vocabulary {shape.vocab:,}: {numbers.total / 1e9:.3f} B parameters, "
        f"{local / 1e9:.3f} B per device" + (f" (stage {fullest.layers.index})" if pp > 1 else ""),
        f"job: {plan.world_size} devices, {layout}expert parallel {plan.ep_size} (data parallel "
        f"{plan.data_parallel} for dense weights, {plan.world_size // (plan.ep_size * pp)} for "
        f"experts); micro batch {t.micro_batch_size} x {t.seq_length} tokens, "
        f"{plan.micro_batches} per device and step; {t.precision}; recompute {t.recompute}"
        + ("; optimizer sharded" if t.shard_optimizer else ""),
        "",
    ]
    if pp > 1:
        lines += _stage_table(plan) + [""]
    lines.append(
        f"{'per device' + (f' (stage {fullest.layers.index}, the fullest)' if pp > 1 else ''):<46}"
        f"{'GiB':>9}"
    )
    rows = [
        (f"parameters ({t.precision})", plan.states.params),
        ("gradients (fp32 main_grad buffers)", plan.states.grads),
        (_optimizer_label(t.precision, t.shard_optimizer), plan.states.optimizer),
        (f"activations, {_in_flight(fullest)} (recompute {t.recompute})",
         plan.activations[t.recompute].peak),
        ("total", plan.total_bytes()),
    ]  # fmt: skip
    lines += [f"  {label:<44}{_gib(n):>9}" for label, n in rows]
    free = plan.gpu_memory_bytes - plan.total_bytes()
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"  {verdict} in {_gib(plan.gpu_memory_bytes)} GiB ({_gib(abs(free))} GiB "
        f"{'free' if free >= 0 else 'short'}; allocator and workspace overheads not counted)"
    )
    if not plan.fits:
        fixes = [
            " ".join(f"trainer.{key}={value}" for key, value in fix.items())
            for fix in suggestions(plan, vocab_size)
        ]
        lines.append("  to fit: " + (" | or: ".join(fixes) if fixes else "no setting found"))
    lines += ["", *_activation_table(plan), "", *_traffic_and_speed(plan)]
    return "\n".join(lines)


def _in_flight(stage: StagePlan) -> str:
    n = stage.in_flight
    return "one micro batch" if n == 1 else f"{n} micro batches in flight"


def _stage_table(plan: Plan) -> list[str]:
    rc = plan.recompute
    lines = [f"{'pipeline stages (GiB per device)':<30}{'layers':>7}{'MoE':>5}{'in flight':>10}"
             f"{'states':>9}{'activ.':>9}{'total':>9}"]  # fmt: skip
    for stage in plan.stages:
        layers = stage.layers
        lines.append(
            f"  stage {layers.index:<22}{layers.layers:>7}{layers.moe_layers:>5}"
            f"{stage.in_flight:>10}{_gib(stage.states.total):>9}"
            f"{_gib(stage.activations[rc].peak):>9}{_gib(stage.total_bytes(rc)):>9}"
        )
    return lines


def _activation_table(plan: Plan) -> list[str]:
    keys: list[str] = []
    for acts in plan.activations.values():
        keys += [k for k in acts.parts if k not in keys]
    header = "".join(f"{rc:>9}" for rc in RECOMPUTE_SETTINGS)
    what = f"activations, {_in_flight(plan.fullest())} (GiB), recompute:"
    lines = [f"{what:<46}{header}"]
    for key in keys:
        if not any(plan.activations[rc].parts.get(key, 0) for rc in RECOMPUTE_SETTINGS):
            continue  # a part this model does not have (no shared expert, no dense layer)
        values = "".join(
            f"{_gib(plan.activations[rc].parts.get(key, 0)):>9}" for rc in RECOMPUTE_SETTINGS
        )
        lines.append(f"  {PART_LABELS[key]:<44}{values}")
    for label, attr in (("kept for backward", "kept"), ("peak (estimate)", "peak")):
        values = "".join(
            f"{_gib(getattr(plan.activations[rc], attr)):>9}" for rc in RECOMPUTE_SETTINGS
        )
        lines.append(f"  {label:<44}{values}")
    return lines


def _traffic_and_speed(plan: Plan) -> list[str]:
    f = plan.flops
    per_device = plan.tokens_per_s_per_device
    if plan.ep_size > 1:
        share = (plan.ep_size - 1) / plan.ep_size
        a2a = (
            f"all-to-all per device and step: {_gib(plan.a2a_bytes)} GiB sent and as much "
            f"received ({share:.0%} of it leaves the device; MoNE moves what MoE moves)"
        )
    else:
        a2a = "all-to-all: none (expert parallel size 1)"
    return [
        a2a,
        f"training FLOPs per token: {f.executed / 1e9:.2f} G executed (top-{plan.shape.topk} "
        f"whole experts) | {f.mone_activated / 1e9:.2f} G MoNE-activated weights | "
        f"{f.dense_equivalent / 1e9:.2f} G if every expert ran",
        f"at MFU {plan.mfu:.2f} on {plan.gpu} ({plan.peak_tflops:g} TFLOP/s "
        f"{'bf16' if plan.cfg.trainer.precision == 'bf16' else 'tf32'}): "
        f"{per_device:,.0f} tokens/s per device, {per_device * plan.world_size:,.0f} for the job"
        + (" (before the pipeline bubble)" if plan.shape.pp > 1 else ""),
    ]
