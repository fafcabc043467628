"""``mone-plan --search``: the fastest parallel layout that fits, before anyone rents a cluster.

Every layout mone-train can run is enumerated for the job's GPUs: tensor parallel TP (with
sequence parallelism, within a node), pipeline parallel PP (1F1B), expert parallel EP (experts
whole, ETP = 1), the data-parallel sizes they leave, the micro batch, activation recompute
(none / moe / full) and ZeRO-1 on or off. The global batch and sequence length are the config's.
A layout is kept when the planner's memory of its fullest stage (exact model states, estimated
activations: ``mone_train/planning/plan.py``) fits in the GPU's memory minus a headroom. Kept layouts are
ranked by the step time of the cost model below; docs/memory.md writes the model down with its
constants and how it compares with published training runs.

Per optimizer step, on the device of the fullest pipeline stage (m micro batches per
data-parallel rank, P stages):

    step = (m + P - 1) * t_micro + exposed(t_grad_sync) + t_optimizer
    t_micro = t_compute / m + exposed(t_tp) + exposed(t_all_to_all) + t_p2p

- t_compute: the model's training FLOPs of the step (``plan.flops_per_token``: 6 x the weights
  a token runs through + attention, the trainer's MFU formula) times the recompute factor
  (``full``: one more forward, +1/3; ``moe``: the MoE layers' forward again), divided evenly over
  the devices, at the GPU's achievable GEMM efficiency; the routed experts' GEMMs lose
  efficiency when few rows reach an expert: x rows run at x / (x + 256) of it.
- the elementwise work around the GEMMs (norms, residuals, the MoE permutation and SwiGLU)
  moves about 2 bytes x (6 h per layer + (2 k h + 3 k F) per MoE layer) per token forward, twice
  that backward, at the GPU's HBM bandwidth (added to t_compute).
- t_tp: per layer, sequence parallelism all-gathers and reduce-scatters each block's input and
  output (2 collectives forward, 3 backward, per attention block and per dense or shared-expert
  MLP), each moving (TP - 1) / TP of a micro batch's activations over NVLink.
- t_all_to_all: per MoE layer, dispatch and combine forward and backward (again under
  recompute), (EP - 1) / EP of the routed rows leaving the device; the part that leaves the node
  (EP larger than a node) at the network's bandwidth.
- t_p2p: a micro batch's activations to the next stage and its gradient back.
- t_grad_sync: the gradients' all-reduce over data parallel (dense weights) and expert data
  parallel (experts), ring volume 2 (n - 1) / n in fp32, and with ZeRO-1 the owners' weight
  broadcasts; over the network when the group leaves the node.
- t_optimizer: AdamW reads and writes each local weight's fp32 master, moments and gradient
  from HBM.
- exposed(t) = (1 - overlap) x t, with the overlap of each kind a parameter (mone-train's
  defaults: none of it is overlapped; megatron-core can hide the gradient all-reduce behind the
  backward, and with TransformerEngine part of the TP collectives).

MFU = model FLOPs of the step (without recompute) / (devices x peak x step time).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

from mone_train.config import Config, layout_problem
from mone_train.errors import ConfigError
from mone_train.hardware import GIB, GPUS, Hardware
from mone_train.planning.plan import (
    FP32,
    PRECISION_BYTES,
    RECOMPUTE_SETTINGS,
    Plan,
    make_plan,
    parameter_numbers,
)

HARDWARE = {name: hw for name, hw in GPUS.items() if hw.searchable}  # with link figures
EXPERT_ROWS_HALF_EFFICIENCY = 256  # rows reaching an expert at which its GEMMs run at half speed
OPTIMIZER_BYTES_PER_PARAM = 36  # AdamW: fp32 master, two moments, gradient; read and written
DEFAULT_HEADROOM = 0.10  # of the GPU's memory: allocator fragmentation, workspaces
CONTEXT_GIB = 2.0  # CUDA context, NCCL buffers, kernels' workspaces
A2A_EFFICIENCY = 0.6  # an all-to-all reaches this share of a link's collective bandwidth


@dataclass(frozen=True)
class Overlap:
    """The share of each communication hidden behind computation (0: none)."""

    tp: float = 0.0
    all_to_all: float = 0.0
    grad_sync: float = 0.0
    p2p: float = 0.0  # stage-to-stage sends (megatron's interleaved schedule overlaps them)


@dataclass(frozen=True)
class Dispatcher:
    """How the expert-parallel all-to-all moves tokens.

    ``alltoall`` is megatron-core's all-to-all token dispatcher, the one mone-train runs: every
    (token, expert) row travels to its expert's GPU, across the network when that GPU is in
    another node. ``deepep`` models DeepEP-style dispatch (megatron's ``flex`` dispatcher): a
    token crosses to each remote node once and is forwarded over NVLink there, at a higher
    share of the links' bandwidth."""

    name: str
    efficiency: float  # share of a link's collective bandwidth an all-to-all reaches
    node_dedup: bool


DISPATCHERS = {
    "alltoall": Dispatcher("alltoall", A2A_EFFICIENCY, False),
    "deepep": Dispatcher("deepep", 0.85, True),
}


@dataclass(frozen=True)
class Layout:
    """The trainer settings a search varies."""

    tp: int
    pp: int
    ep: int
    micro_batch: int
    recompute: str
    zero: bool
    vpp: int = 1  # virtual stages per pipeline rank (interleaved 1F1B; not in mone-train yet)

    def overrides(self) -> list[str]:
        """The ``mone-train`` overrides that select this layout."""
        return [
            f"trainer.tensor_parallel_size={self.tp}",
            f"trainer.pipeline_parallel_size={self.pp}",
            f"trainer.expert_parallel_size={self.ep}",
            f"trainer.micro_batch_size={self.micro_batch}",
            f"trainer.recompute={self.recompute}",
            f"trainer.shard_optimizer={str(self.zero).lower()}",
        ]

    def applied_to(self, cfg: Config) -> Config:
        """``cfg`` with this layout's trainer settings (what ``overrides`` would select)."""
        trainer = replace(
            cfg.trainer,
            tensor_parallel_size=self.tp,
            pipeline_parallel_size=self.pp,
            expert_parallel_size=self.ep,
            micro_batch_size=self.micro_batch,
            recompute=self.recompute,
            shard_optimizer=self.zero,
        )
        return replace(cfg, trainer=trainer)

    def label(self) -> str:
        vpp = f" VPP {self.vpp}" if self.vpp > 1 else ""
        return (
            f"TP {self.tp} PP {self.pp}{vpp} EP {self.ep} mb {self.micro_batch} "
            f"rc {self.recompute} {'ZeRO-1' if self.zero else 'no-ZeRO'}"
        )


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step by part (the exposed share of communication)."""

    compute: float
    memory_bound: float
    bubble: float
    tp: float
    all_to_all: float
    p2p: float
    grad_sync: float
    optimizer: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its memory, step time and throughput."""

    layout: Layout
    data_parallel: int
    expert_data_parallel: int
    micro_batches: int
    memory_gib: float
    time: StepTime
    tokens_per_s: float
    mfu: float


@dataclass(frozen=True)
class SearchResult:
    """Every fitting layout, fastest first, and what was left out."""

    candidates: list[Candidate]
    considered: int  # layouts that are valid for the model and the world size
    too_big: int  # of those, layouts that do not fit
    closest: tuple[Layout, float] | None  # the smallest layout that does not fit, GiB
    usable_gib: float


def step_time(
    plan: Plan,
    hw: Hardware,
    gpus_per_node: int,
    overlap: Overlap,
    vpp: int = 1,
    dispatcher: Dispatcher = DISPATCHERS["alltoall"],
) -> StepTime:
    """The cost model (module docstring) for the layout of ``plan``; with ``vpp`` virtual
    stages per pipeline rank (megatron's interleaved 1F1B) the bubble divides by ``vpp`` and
    every micro batch crosses ``vpp`` times as many stage boundaries."""
    shape, m, pp = plan.shape, plan.micro_batches, plan.shape.pp
    compute, memory_bound = _compute_seconds(plan, hw)
    tp_time = _tp_seconds(plan, hw)  # per micro batch, as the three below
    a2a_time = _all_to_all_seconds(plan, hw, gpus_per_node, dispatcher)
    p2p = 0.0
    if pp > 1:  # a micro batch's activations forward and their gradient back, per boundary
        boundary = shape.sp_tokens * shape.hidden * shape.bytes_per_act
        link = hw.nvlink_gbps if plan.world_size <= gpus_per_node else hw.network_gbps
        p2p = 2 * vpp * boundary / (link * 1e9) * (1 - overlap.p2p)
    grad_sync, optimizer = _grad_sync_and_optimizer_seconds(plan, hw, gpus_per_node)
    per_micro = (compute + memory_bound) / m
    exposed_tp = tp_time * (1 - overlap.tp)
    exposed_a2a = a2a_time * (1 - overlap.all_to_all)
    return StepTime(
        compute=compute,
        memory_bound=memory_bound,
        bubble=(pp - 1) / vpp * (per_micro + exposed_tp + exposed_a2a + p2p),
        tp=m * exposed_tp,
        all_to_all=m * exposed_a2a,
        p2p=m * p2p,
        grad_sync=grad_sync * (1 - overlap.grad_sync),
        optimizer=optimizer,
    )


def _compute_seconds(plan: Plan, hw: Hardware) -> tuple[float, float]:
    """(GEMM time, elementwise time) of the step on one GPU (the work spread evenly)."""
    shape, t = plan.shape, plan.cfg.trainer
    peak = hw.peak_tflops * 1e12 * (1.0 if t.precision == "bf16" else 0.5)
    tokens = t.global_batch_size * t.seq_length
    # the dense part and the routed experts' part of the executed FLOPs
    executed = plan.flops.executed * tokens
    moe_layers = shape.num_moe_layers + shape.mtp_moe_layers  # multi-token prediction's too
    expert = 6.0 * moe_layers * shape.topk * 3 * shape.hidden * shape.neurons * tokens
    dense = executed - expert
    rc_dense = dense / 3 if t.recompute == "full" else 0.0
    rc_expert = expert / 3 if t.recompute in ("moe", "full") else 0.0
    rows = shape.sp_tokens * shape.topk * plan.ep_size / shape.experts  # per expert, micro batch
    expert_efficiency = rows / (rows + EXPERT_ROWS_HALF_EFFICIENCY)
    compute = (
        (dense + rc_dense) / (peak * hw.gemm_efficiency)
        + (expert + rc_expert) / (peak * hw.gemm_efficiency * expert_efficiency)
    ) / plan.world_size
    # the elementwise work around the GEMMs, bound by HBM: per token and layer the norms and
    # residuals (about 6 h values), and in a MoE layer the permutation to and from the experts
    # (2 k h), SwiGLU (3 k F); read and written in 2-byte values, backward twice the forward
    h, kF = shape.hidden, shape.topk * shape.neurons
    layers = shape.num_layers + shape.mtp_layers
    per_token = layers * 6 * h + moe_layers * (2 * shape.topk * h + 3 * kF)
    passes = 3 + (1 if t.recompute == "full" else 0)
    elementwise = passes * 2 * per_token * tokens / plan.world_size / (hw.hbm_gbps * 1e9)
    return compute, elementwise


def _tp_seconds(plan: Plan, hw: Hardware) -> float:
    """Sequence-parallel gathers and scatters of a micro batch on the fullest stage."""
    shape, tp = plan.shape, plan.shape.tp
    if tp == 1:
        return 0.0
    stage = plan.fullest().layers
    blocks = stage.layers + (stage.layers - stage.moe_layers)
    blocks += stage.moe_layers if shape.shared else 0  # the shared expert is a TP MLP
    collectives = blocks * (5 + (2 if plan.cfg.trainer.recompute == "full" else 0))
    moved = shape.tokens * shape.hidden * shape.bytes_per_act * (tp - 1) / tp
    return collectives * moved / (hw.nvlink_gbps * 1e9)


def _all_to_all_seconds(
    plan: Plan, hw: Hardware, gpus_per_node: int, dispatcher: Dispatcher
) -> float:
    """The token dispatcher's all-to-alls of a micro batch on the fullest stage."""
    shape, ep = plan.shape, plan.ep_size
    if ep == 1:
        return 0.0
    rows, k = shape.sp_tokens, shape.topk
    row_bytes = 2 * shape.hidden * shape.bytes_per_act + FP32  # dispatch (+ prob), combine
    passes = 3 if plan.cfg.trainer.recompute in ("moe", "full") else 2
    leaving = rows * k * (ep - 1) / ep  # (token, expert) rows to other GPUs
    remote = rows * k * max(0, ep - gpus_per_node) / ep  # ... to GPUs of other nodes
    inter, intra = remote, leaving - remote
    if dispatcher.node_dedup and remote:
        nodes = ep / gpus_per_node  # a token crosses once to each remote node it needs
        inter = rows * (nodes - 1) * (1 - (1 - 1 / nodes) ** k)
        intra = leaving  # the rows that crossed are forwarded over NVLink there
    volume = plan.fullest().layers.moe_layers * passes * row_bytes
    return volume * (
        intra / (hw.nvlink_gbps * dispatcher.efficiency * 1e9)
        + inter / (hw.network_gbps * dispatcher.efficiency * 1e9)
    )


def _grad_sync_and_optimizer_seconds(
    plan: Plan, hw: Hardware, gpus_per_node: int
) -> tuple[float, float]:
    """Gradient all-reduces (+ ZeRO-1 weight broadcasts) and the AdamW step, per step."""
    shape, t = plan.shape, plan.cfg.trainer
    numbers = parameter_numbers(shape, plan.fullest().layers)
    dp, edp = plan.data_parallel, plan.world_size // (plan.ep_size * shape.pp)
    weight_bytes = PRECISION_BYTES[t.precision][0]
    grad_sync = 0.0
    for params, n, span in ((numbers.dense, dp, shape.tp * dp),
                            (numbers.expert_local, edp, plan.ep_size * edp)):  # fmt: skip
        if n == 1 or params == 0:
            continue
        link = hw.nvlink_gbps if span <= gpus_per_node else hw.network_gbps
        volume = 2 * (n - 1) / n * params * FP32
        if t.shard_optimizer:
            volume += (n - 1) / n * params * weight_bytes
        grad_sync += volume / (link * 1e9)
    owned = numbers.local
    if t.shard_optimizer:
        owned = numbers.dense / dp + numbers.expert_local / edp
    return grad_sync, OPTIMIZER_BYTES_PER_PARAM * owned / (hw.hbm_gbps * 1e9)


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def layouts(
    cfg: Config, world_size: int, gpus_per_node: int, virtual_stages: tuple[int, ...] = (1,)
) -> list[Layout]:
    """Every layout of ``world_size`` devices the model's shapes and the batch allow (memory
    not yet considered). TP stays within a node. ``virtual_stages`` > 1 (interleaved 1F1B)
    needs the layers to split into PP x VPP equal chunks and the micro batches into PP."""
    m, t = cfg.model, cfg.trainer
    groups = m.num_query_groups or m.num_attention_heads
    out = []
    for tp in _divisors(gpus_per_node, 8):
        if any(v % tp for v in (m.num_attention_heads, groups, m.hidden_size, m.ffn_hidden_size,
                                t.seq_length, m.shared_expert_ffn_hidden_size or tp)):  # fmt: skip
            continue
        if tp > 1 and (m.qk_layernorm == "full" or m.norm != "fused"):
            continue
        for pp in _divisors(m.num_layers):
            if pp > 1 and m.tie_embeddings:
                continue
            for ep in _divisors(m.num_experts):
                if layout_problem(world_size, tp, pp, ep):
                    continue
                dp = world_size // (tp * pp)
                if t.global_batch_size % dp:
                    continue
                per_rank = t.global_batch_size // dp
                for micro, rc, zero, vpp in itertools.product(
                    _divisors(per_rank, 16), RECOMPUTE_SETTINGS, (False, True), virtual_stages
                ):
                    if zero and world_size == 1:
                        continue
                    if vpp > 1 and (pp == 1 or m.num_layers % (pp * vpp)
                                    or (per_rank // micro) % pp):  # fmt: skip
                        continue
                    out.append(Layout(tp, pp, ep, micro, rc, zero, vpp))
    return out


def search(
    cfg: Config,
    vocab_size: int,
    nodes: int,
    gpus_per_node: int,
    hw: Hardware,
    headroom: float = DEFAULT_HEADROOM,
    overlap: Overlap = Overlap(),
    virtual_stages: tuple[int, ...] = (1,),
    dispatcher: Dispatcher = DISPATCHERS["alltoall"],
) -> SearchResult:
    """Every layout of ``nodes x gpus_per_node`` devices that fits, fastest first.

    ``virtual_stages``: the interleaved schedule's options (1: mone-train's 1F1B). Interleaving
    keeps more micro batches in flight on the first stage: its activations grow by
    1 + (PP - 1) / (PP x VPP) (Korthikanti et al., 2022)."""
    world = nodes * gpus_per_node
    usable = hw.memory_gib * (1 - headroom) - CONTEXT_GIB
    candidates, too_big, closest = [], 0, None
    all_layouts = layouts(cfg, world, gpus_per_node, virtual_stages)
    for layout in all_layouts:
        try:
            plan = make_plan(layout.applied_to(cfg), vocab_size, world, hw.memory_gib,
                             gpu=hw.name)  # fmt: skip
        except ConfigError:
            continue
        memory = plan.total_bytes() / GIB
        if layout.vpp > 1:
            fullest = plan.fullest()
            grow = (layout.pp - 1) / (layout.pp * layout.vpp)
            memory += grow * fullest.activations[layout.recompute].peak / GIB
        if memory > usable:
            too_big += 1
            if closest is None or memory < closest[1]:
                closest = (layout, memory)
            continue
        time = step_time(plan, hw, gpus_per_node, overlap, layout.vpp, dispatcher)
        tokens = cfg.trainer.global_batch_size * cfg.trainer.seq_length
        peak = hw.peak_tflops * 1e12 * (1.0 if cfg.trainer.precision == "bf16" else 0.5)
        candidates.append(Candidate(
            layout=layout,
            data_parallel=plan.data_parallel,
            expert_data_parallel=world // (layout.ep * layout.pp),
            micro_batches=plan.micro_batches,
            memory_gib=memory,
            time=time,
            tokens_per_s=tokens / time.total,
            mfu=plan.flops.executed * tokens / (world * peak * time.total),
        ))  # fmt: skip
    candidates.sort(key=lambda c: (c.time.total, c.memory_gib))
    considered = len(candidates) + too_big
    if not all_layouts:
        raise ConfigError(
            f"no layout of {world} GPUs ({nodes} x {gpus_per_node}) suits the model: TP must "
            "divide the heads, query groups, hidden and FFN sizes and the sequence, PP the "
            "layers, EP the experts, and TP x PP and EP x PP the world size, with the global "
            f"batch ({cfg.trainer.global_batch_size}) a multiple of the data-parallel size"
        )
    return SearchResult(candidates, considered, too_big, closest, usable)


# ------------------------------------------------------------------------------ printing

PARTS = ("compute", "memory_bound", "bubble", "tp", "all_to_all", "p2p", "grad_sync", "optimizer")
PART_NAMES = {
    "compute": "compute",
    "memory_bound": "elementwise (HBM-bound)",
    "bubble": "pipeline bubble",
    "tp": "exposed TP collectives",
    "all_to_all": "exposed all-to-all",
    "p2p": "stage-to-stage sends",
    "grad_sync": "exposed gradient sync",
    "optimizer": "optimizer step",
}


def why_slower(candidate: Candidate, best: Candidate) -> str:
    """The parts that make ``candidate`` slower than ``best``, largest first."""
    deltas = []
    for part in PARTS:
        delta = getattr(candidate.time, part) - getattr(best.time, part)
        if delta > 0.005 * best.time.total:
            deltas.append((delta, part))
    deltas.sort(reverse=True)
    reasons = [f"{PART_NAMES[part]} +{delta:.3g} s" for delta, part in deltas[:2]]
    return ", ".join(reasons) or "about as fast"


def launch_line(candidate: Candidate, nodes: int, gpus_per_node: int, overrides: list[str]) -> str:
    """The command that starts this layout (on every node for several)."""
    settings = " ".join([*overrides, *candidate.layout.overrides()])
    if nodes == 1:
        return f"launch/torchrun.sh {gpus_per_node} {settings}"
    return (
        f"NNODES={nodes} MASTER_ADDR=<first node> launch/torchrun.sh {gpus_per_node} {settings}"
        f"   (or: sbatch --nodes {nodes} launch/slurm.sbatch {settings})"
    )


def format_search(
    result: SearchResult,
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    hw: Hardware,
    overrides: list[str],
    top: int = 5,
) -> str:
    """The table ``mone-plan --search`` prints."""
    t = cfg.trainer
    world = nodes * gpus_per_node
    lines = [
        f"model {cfg.model.name} ({cfg.moe.flavour}), {nodes} x {gpus_per_node} {hw.name}: "
        f"global batch {t.global_batch_size} x {t.seq_length} tokens, {t.precision}",
        f"{result.considered} valid layouts, {len(result.candidates)} fit in "
        f"{result.usable_gib:.1f} GiB per GPU ({hw.memory_gib:.0f} GiB less headroom and "
        f"context); ranked by the cost model's step time (docs/memory.md)",
        "",
        f"{'#':>2} {'TP':>3} {'PP':>3} {'EP':>3} {'DP':>4} {'EDP':>4} {'mb':>3} {'recompute':>9} "
        f"{'ZeRO':>5} {'GiB':>6} {'step s':>8} {'tok/s':>11} {'MFU':>6}  why slower than #1",
    ]
    best = result.candidates[0]
    for i, c in enumerate(result.candidates[:top], 1):
        lay = c.layout
        lines.append(
            f"{i:>2} {lay.tp:>3} {lay.pp:>3} {lay.ep:>3} {c.data_parallel:>4} "
            f"{c.expert_data_parallel:>4} {lay.micro_batch:>3} {lay.recompute:>9} "
            f"{'on' if lay.zero else 'off':>5} {c.memory_gib:>6.1f} {c.time.total:>8.3f} "
            f"{c.tokens_per_s:>11,.0f} {c.mfu:>6.1%}  "
            + ("-" if c is best else why_slower(c, best))
        )
    parts = ", ".join(f"{PART_NAMES[p]} {getattr(best.time, p):.3g}" for p in PARTS
                      if getattr(best.time, p) > 0)  # fmt: skip
    lines += [
        "",
        f"#1 step {best.time.total:.3f} s: {parts} (seconds); {best.tokens_per_s / world:,.0f} "
        f"tokens/s per GPU",
        f"launch: {launch_line(best, nodes, gpus_per_node, overrides)}",
    ]
    if result.too_big:
        lay, gib = result.closest
        lines.append(
            f"{result.too_big} layouts do not fit; the smallest of them needs {gib:.1f} GiB "
            f"({lay.label()})"
        )
    return "\n".join(lines)


def as_json(result: SearchResult, nodes: int, gpus_per_node: int, hw: Hardware,
            overrides: list[str], top: int) -> dict:  # fmt: skip
    """The search for scripts (``--json``)."""
    best = result.candidates[0]
    return {
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "gpu": asdict(hw),
        "usable_gib": result.usable_gib,
        "considered": result.considered,
        "fit": len(result.candidates),
        "layouts": [
            {
                **asdict(c.layout),
                "data_parallel": c.data_parallel,
                "expert_data_parallel": c.expert_data_parallel,
                "micro_batches": c.micro_batches,
                "memory_gib": c.memory_gib,
                "step_s": c.time.total,
                "time": asdict(c.time),
                "tokens_per_s": c.tokens_per_s,
                "mfu": c.mfu,
                "overrides": c.layout.overrides(),
                "why_slower": None if c is best else why_slower(c, best),
            }
            for c in result.candidates[:top]
        ],
        "launch": launch_line(best, nodes, gpus_per_node, overrides),
    }


def no_fit_message(result: SearchResult, nodes: int, gpus_per_node: int, hw: Hardware) -> str:
    """One line: nothing fits, by how much, and the closest layout."""
    lay, gib = result.closest
    return (
        f"no layout of {nodes} x {gpus_per_node} {hw.name} fits: the smallest of "
        f"{result.considered} needs {gib:.1f} GiB per GPU, {gib - result.usable_gib:.1f} GiB "
        f"over the {result.usable_gib:.1f} usable ({lay.label()}); more nodes, a shorter "
        "sequence or a smaller global batch per GPU are the knobs left"
    )
