"""MoE / MoNE health metrics, gathered by hooks during training steps and reduced at log time.

Per MoE layer ``L`` (0-based decoder layer index, as in ``mone-analyze`` and Hugging Face
module names; megatron-core's ``layer_number`` minus one) and log interval:

    load/L/imbalance        max over experts of routed tokens / mean over experts (1 = even)
    load/L/tokens           routed (token, expert) pairs per expert, whole job   [JSONL only]
    neurons/L/utilisation   mean over experts of the fraction of neurons selected at least once
    neurons/L/never_selected  neurons (summed over experts) never selected in the interval
    neurons/L/per_expert    fraction per expert                                   [JSONL only]
    gate_abs/q10 .. q99     quantiles of |SiLU(gate)| over sampled expert rows, all layers
    gate_abs/frac_below_0.01, frac_below_0.1

and for the recipes that have them (``arch=``):

    load/L/dropped          share of (token, expert) choices dropped by the capacity factor
    router/L/expert_bias_min, _max   the loss-free balancing bias of the layer's experts
    shared/L/output_share   ||shared expert output|| / ||MoE layer output|| over the interval's
                            tokens (square roots of summed squares: any layout gives the same)
    neurons/L/bias_min, _max         the neuron-level balance bias (moe.neuron_balance=bias)

(the z-loss is megatron's, logged beside the auxiliary loss by the metrics).
Neuron utilisation exists for MoNE experts with K < F (for plain MoE every neuron of an
activated expert is used). ``load/imbalance`` and ``neurons/utilisation`` (no layer) are the
worst layer's imbalance and the mean utilisation over layers, for the terminal line.

What is observed when (the trainer arms the monitor with :meth:`HealthMonitor.sample` for the
steps that will be logged):

- every step: the counts, one column sum per layer of the routing map (``load/L/tokens`` and
  ``imbalance``, ``load/L/dropped``): the interval's totals, as before;
- only the steps that will be logged: what reads activations — the neuron masks (MoNE experts
  build their ``[tokens, F]`` mask only then), the |SiLU(gate)| histogram and the
  shared-expert output norms. ``neurons/*``, ``gate_abs/*`` and ``shared/*`` describe the
  logged step (with ``trainer.log_interval=1``, every step, as before).

Between logs the monitor therefore adds one small reduction per MoE layer and nothing else: no
mask, no histogram, no host copy, no collective. Counters stay on the compute device; they are
summed (or OR-ed) across ranks and copied to the host only at log time (:meth:`collect`), one
all-reduce per kind. Only training-mode forwards that record the autograd graph are observed:
evaluation does not count, and under activation recompute (``trainer.recompute``) each forward
counts once. Costs: benchmarks/health_overhead.py.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mone_train import hardware

GATE_ROWS = 16  # rows of fc1 output sampled per expert call for the |SiLU(gate)| histogram
BINS_PER_DECADE = 20
LOG10_MIN, LOG10_MAX = -8.0, 3.0  # |g| below 1e-8 counts in the first bin, above 1e3 the last
QUANTILES = (0.1, 0.5, 0.9, 0.99)
THRESHOLDS = (0.01, 0.1)


class HealthMonitor:
    """Hooks on every MoE layer of ``model``; ``collect()`` returns the interval's metrics.

    With pipeline stages each rank holds some of the layers: the counters of every MoE layer of
    the whole model exist on every rank (zero where the layer lives elsewhere), so that the
    job-wide sums are one all-reduce per kind as without stages.
    """

    def __init__(self, model: torch.nn.Module, ep_rank: int = 0, device=None) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        from mone_train.model.mone_experts import MoNEExperts

        self._handles = []
        self._observed_experts = []  # MoNE experts whose ``monitor`` callback is ours
        self._observers: dict[torch.nn.Module, object] = {}  # their callbacks while sampling
        self.sampling = True  # whether this forward's activations are read (see sample())
        self._device = device or torch.device("cpu")
        self.num_bins = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)
        self._routers: dict[int, torch.nn.Module] = {}  # read at collect: expert biases
        self._experts: dict[int, torch.nn.Module] = {}  # read at collect: neuron biases
        # Counters live on the compute device (no host sync per hook); collect() moves them.
        self._hist = torch.zeros(self.num_bins, dtype=torch.float64, device=self._device)
        local: dict[int, dict] = {}  # this rank's MoE layers and what each one has
        hooks = []
        for module in model.modules():
            if not isinstance(module, MoELayer):
                continue
            layer = int(module.layer_number) - 1
            experts = module.experts
            offset = ep_rank * len(experts.local_experts)
            mone = isinstance(experts, MoNEExperts) and experts.num_kept < experts.num_neurons
            local[layer] = {
                "experts": module.config.num_moe_experts,
                "neurons": experts.local_experts[0].linear_fc2.weight.shape[1],
                "used": mone,
                "dropped": module.config.moe_expert_capacity_factor is not None,
                "shared": module.shared_experts is not None,
                "expert_bias": getattr(module.router, "expert_bias", None) is not None,
                "neuron_bias": getattr(experts, "neuron_bias", None) is not None,
            }
            self._routers[layer] = module.router
            self._experts[layer] = experts
            hooks.append((layer, module, offset, mone))
        schema = _job_wide(local)
        self.layers: list[int] = sorted(schema)
        first = schema[self.layers[0]] if self.layers else {"experts": 0, "neurons": 0}
        self.num_experts, self.num_neurons = first["experts"], first["neurons"]

        def counters(kind: str, *shape: int, dtype=torch.float64) -> dict[int, torch.Tensor]:
            return {
                layer: torch.zeros(*shape, dtype=dtype, device=self._device)
                for layer in self.layers if schema[layer][kind]
            }  # fmt: skip

        self._tokens = {layer: torch.zeros(self.num_experts, dtype=torch.float64,
                                           device=self._device) for layer in self.layers}  # fmt: skip
        self._used = counters("used", self.num_experts, self.num_neurons, dtype=torch.bool)
        self._dropped = counters("dropped", 2)  # [dropped choices, all choices]
        self._shared = counters("shared", 2)  # [sum ||shared out||^2, sum ||layer out||^2]
        # the layers whose routers / experts have a balancing bias (ranges read at collect)
        self._bias_layers = {
            kind: [layer for layer in self.layers if schema[layer][kind]]
            for kind in ("expert_bias", "neuron_bias")
        }
        for layer, module, offset, mone in hooks:
            self._handles.append(module.router.register_forward_hook(self._router_hook(layer)))
            if layer in self._dropped:
                topk = module.config.moe_router_topk
                self._handles.append(
                    module.router.register_forward_hook(self._drop_hook(layer, topk))
                )
            if layer in self._shared:
                self._handles.append(module.register_forward_hook(self._shared_layer_hook(layer)))
                self._handles.append(
                    module.shared_experts.register_forward_hook(self._shared_hook(layer))
                )
            for expert in module.experts.local_experts:
                self._handles.append(expert.linear_fc1.register_forward_hook(self._fc1_hook))
            if mone:
                self._observers[module.experts] = self._neuron_observer(layer, offset)
                self._observed_experts.append(module.experts)
        self.sample(True)

    def sample(self, on: bool) -> None:
        """Read activations (neuron masks, gate magnitudes, shared-expert outputs) in the
        forwards that follow, or not: only the counts then. MoNE experts build no neuron
        mask while off."""
        self.sampling = on
        for experts in self._observed_experts:
            experts.monitor = self._observers[experts] if on else None

    # ----------------------------------------------------------------------------- hooks

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            if observed(module):
                routing_map = output[1]
                self.observe_routing(layer, routing_map)

        return hook

    def _drop_hook(self, layer: int, topk: int):
        def hook(module, args, output):
            if observed(module):
                routing_map = output[1]
                chosen = routing_map.shape[0] * topk
                kept = routing_map.sum()
                self._dropped[layer] += torch.stack([chosen - kept, kept.new_tensor(chosen)])

        return hook

    def _shared_hook(self, layer: int):
        def hook(module, args, output):
            if self.sampling and observed(module):
                self._shared[layer][0] += output.detach().float().square().sum().double()

        return hook

    def _shared_layer_hook(self, layer: int):
        def hook(module, args, output):
            if self.sampling and observed(module):
                out = output[0] if isinstance(output, tuple) else output
                self._shared[layer][1] += out.detach().float().square().sum().double()

        return hook

    def _fc1_hook(self, module, args, output):
        if self.sampling and observed(module):
            self.observe_gate(output[0] if isinstance(output, tuple) else output)

    def _neuron_observer(self, layer: int, offset: int):
        def observe(masks: list[torch.Tensor | None]) -> None:
            self.observe_masks(layer, offset, masks)

        return observe

    # ------------------------------------------------------------------- observations

    def observe_routing(self, layer: int, routing_map: torch.Tensor) -> None:
        """``routing_map [tokens, experts]`` (bool): which experts each token was sent to."""
        self._tokens[layer] += routing_map.sum(dim=0).to(torch.float64)

    def observe_masks(self, layer: int, offset: int, masks: list[torch.Tensor | None]) -> None:
        """Neuron masks ``[T_e, F]`` (bool) of local experts ``offset, offset + 1, ...``."""
        used = self._used[layer]
        for i, mask in enumerate(masks):
            if mask is not None and mask.shape[0] > 0:
                # A column max over uint8: bool any(dim=0) is a slow strided reduction on CPU.
                used[offset + i] |= mask.view(torch.uint8).amax(dim=0).bool()

    def observe_gate(self, fc1: torch.Tensor) -> None:
        """Histogram |SiLU(gate)| of up to GATE_ROWS rows of one expert's ``fc1 [T, 2F]``."""
        rows = fc1.shape[0]
        if rows == 0:
            return
        stride = max(1, rows // GATE_ROWS)
        with torch.no_grad():
            gate = fc1[::stride][:GATE_ROWS, : fc1.shape[1] // 2].float()
            magnitude = F.silu(gate).abs().log10()
            # Out-of-range values land in the end bins (histc would drop them); NaN counts high.
            magnitude = magnitude.nan_to_num(nan=LOG10_MAX).clamp(LOG10_MIN, LOG10_MAX)
            hist = torch.histc(magnitude, bins=self.num_bins, min=LOG10_MIN, max=LOG10_MAX)
        self._hist += hist.to(torch.float64)

    # ------------------------------------------------------------------------- reduce

    def collect(self) -> dict:
        """The interval's metrics (identical on every rank), then start a new interval."""
        layers = self.layers
        tokens = torch.stack([self._tokens[layer] for layer in layers]) if layers else None
        used = torch.stack([self._used[layer] for layer in self._used]) if self._used else None
        hist = self._hist.clone()
        if _distributed():
            if tokens is not None:
                dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
            dist.all_reduce(hist, op=dist.ReduceOp.SUM)
            if used is not None:
                used = used.float()
                dist.all_reduce(used, op=dist.ReduceOp.MAX)
                used = used > 0
        tokens = tokens.cpu() if tokens is not None else None
        used = used.cpu() if used is not None else None
        hist = hist.cpu()
        self.reset()

        metrics: dict = {}
        imbalances = []
        for i, layer in enumerate(layers):
            counts = tokens[i]
            mean = float(counts.mean())
            imbalance = float(counts.max()) / mean if mean > 0 else float("nan")
            imbalances.append(imbalance)
            metrics[f"load/{layer}/imbalance"] = imbalance
            metrics[f"load/{layer}/tokens"] = [int(c) for c in counts.tolist()]
        if imbalances:
            metrics["load/imbalance"] = max(imbalances)
        if used is not None:
            utilisations = []
            for i, layer in enumerate(self._used):
                per_expert = used[i].float().mean(dim=1)
                utilisations.append(float(per_expert.mean()))
                metrics[f"neurons/{layer}/utilisation"] = utilisations[-1]
                metrics[f"neurons/{layer}/never_selected"] = int((~used[i]).sum())
                metrics[f"neurons/{layer}/per_expert"] = [round(float(u), 4) for u in per_expert]
            metrics["neurons/utilisation"] = sum(utilisations) / len(utilisations)
        metrics.update(histogram_summary(hist))
        metrics.update(self._recipe_metrics())
        return metrics

    def _recipe_metrics(self) -> dict:
        """Dropped-token shares, shared-expert output shares (job-wide) and the bias ranges
        (replicated: a router's bias is the same on every rank; a rank's experts' neuron biases
        are reduced to the job's min and max)."""
        metrics: dict = {}
        sums = {f"load/{layer}/dropped": v for layer, v in self._dropped.items()}
        sums.update({f"shared/{layer}/output_share": v for layer, v in self._shared.items()})
        if sums:
            stacked = torch.stack(list(sums.values()))
            if _distributed():
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            for (key, _), (part, whole) in zip(sums.items(), stacked.cpu().tolist()):
                if key.startswith("shared/"):  # a ratio of norms: of the summed squares
                    part, whole = math.sqrt(part), math.sqrt(whole)
                metrics[key] = part / whole if whole else None
            for values in sums.values():
                values.zero_()
        # Bias ranges: +inf / -inf where the layer lives on another pipeline stage, so that one
        # MIN all-reduce over [min, -max] gives the job's range of every layer.
        ranges: dict[str, torch.Tensor] = {}
        for prefix, modules, name in (("router/{}/expert_bias", self._routers, "expert_bias"),
                                      ("neurons/{}/bias", self._experts, "neuron_bias")):  # fmt: skip
            for layer in self._bias_layers[name]:
                bias = getattr(modules.get(layer), name, None)
                ranges[prefix.format(layer)] = (
                    torch.stack([bias.min(), -bias.max()]).double().to(self._device)
                    if bias is not None
                    else torch.full((2,), math.inf, dtype=torch.float64, device=self._device)
                )
        if ranges:
            stacked = torch.stack(list(ranges.values()))
            if _distributed():
                dist.all_reduce(stacked, op=dist.ReduceOp.MIN)
            for key, (low, neg_high) in zip(ranges, stacked.cpu().tolist()):
                metrics[f"{key}_min"] = low
                metrics[f"{key}_max"] = -neg_high
        return metrics

    def reset(self) -> None:
        for counts in self._tokens.values():
            counts.zero_()
        for used in self._used.values():
            used.zero_()
        self._hist.zero_()

    def remove(self) -> None:
        """Undo everything the constructor installed (hooks and MoNE callbacks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for experts in self._observed_experts:
            experts.monitor = None
        self._observed_experts, self._observers = [], {}


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _job_wide(local: dict[int, object]) -> dict[int, object]:
    """``{layer: value}`` of this rank merged with every other rank's (pipeline stages hold
    different layers; ranks holding the same layer agree on its value)."""
    if not _distributed():
        return dict(local)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    merged: dict[int, object] = {}
    for part in every:
        merged.update(part)
    return merged


def observed(module: torch.nn.Module) -> bool:
    """Whether a forward of ``module`` counts: a training forward that records the graph.

    Under activation recompute the forward runs first without grad and again, with grad,
    inside backward; only the second builds the graph, so each training forward counts once
    (the rule megatron's router applies to its own statistics).
    """
    return module.training and torch.is_grad_enabled()


def histogram_summary(hist: torch.Tensor) -> dict:
    """Quantiles and threshold fractions of |g| from the log10-binned histogram."""
    total = float(hist.sum())
    if total == 0:
        return {}
    width = 1.0 / BINS_PER_DECADE
    cdf = torch.cumsum(hist, 0) / total
    out = {}
    for q in QUANTILES:
        i = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=len(hist) - 1))
        before = float(cdf[i - 1]) if i > 0 else 0.0
        inside = (q - before) / max(float(cdf[i]) - before, 1e-12)  # linear in log10 in the bin
        out[f"gate_abs/q{round(q * 100):02d}"] = 10 ** (LOG10_MIN + (i + inside) * width)
    for threshold in THRESHOLDS:
        edge = (math.log10(threshold) - LOG10_MIN) * BINS_PER_DECADE
        whole = int(edge)
        below = float(hist[:whole].sum()) + float(hist[whole]) * (edge - whole)
        out[f"gate_abs/frac_below_{threshold:g}"] = below / total
    return out


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a known accelerator (fp32 matmuls count at the tf32 peak when
    TF32 is allowed), or None."""
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    return hardware.peak_tflops(device_name, precision)


def model_flops_per_token(
    activated_params: int,
    num_layers: int,
    hidden: int,
    seq_length: int,
    attention_width: int | None = None,
) -> float:
    """Training FLOPs per token: 6 x activated weights + attention scores, 6 L s w, where w is
    the query/key width plus the value width of all heads (2 h by default: 12 L h s)."""
    width = 2 * hidden if attention_width is None else attention_width
    return 6.0 * activated_params + 6.0 * num_layers * width * seq_length


def training_flops_per_token(
    model, activated_params: int, vocab_size: int, seq_length: int
) -> float:
    """:func:`model_flops_per_token` of a ``ModelConfig``: multi-head latent attention's
    scores over its own head sizes (a (qk_head_dim + qk_pos_emb_head_dim + v_head_dim)), and
    each multi-token prediction layer counted as a layer that runs the output layer once more
    (V h weights on top of ``activated_params``, which count that layer once)."""
    mtp = model.mtp_num_layers
    width = None
    if model.multi_latent_attention:
        head = model.qk_head_dim + model.qk_pos_emb_head_dim + model.v_head_dim
        width = model.num_attention_heads * head
    return model_flops_per_token(
        activated_params + mtp * vocab_size * model.hidden_size,
        model.num_layers + mtp,
        model.hidden_size,
        seq_length,
        width,
    )
