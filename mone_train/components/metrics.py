"""The trainer's metrics component: what one log record of the training loop holds.

Per log interval: mean loss, learning rate, gradient norm, tokens/s (time spent evaluating or
saving excluded), megatron's auxiliary losses and our NG-LBL (read from megatron's tracker),
expert-parallel all-to-all bytes, activated parameters both ways, the MoE/MoNE health metrics
and, on GPU, MFU and peak memory. Records go through :class:`~mone_train.components.tracking.MetricsLogger`.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from mone_train.components.health import HealthMonitor, peak_tflops, training_flops_per_token
from mone_train.components.stragglers import StragglerReport
from mone_train.components.tracking import MetricsLogger
from mone_train.config import Config
from mone_train.model.builder import num_moe_layers
from mone_train.model.params import ParamCounts
from mone_train.parallel import comm_stats
from mone_train.parallel.process_groups import DistInfo, on_cuda


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line."""

    loss: float = 0.0  # over steps with a finite loss
    finite_losses: int = 0
    steps: int = 0
    skipped: int = 0  # steps whose update was skipped (non-finite loss or gradient norm)
    a2a_bytes: int = 0
    collective_s: float = 0.0  # in collectives, up to the last pause (the straggler report)
    start: float = field(default_factory=time.perf_counter)


class TrainMetrics:
    """Accumulates the steps of a log interval and writes one record when it is due."""

    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        model: torch.nn.Module,
        counts: ParamCounts,
        logger: MetricsLogger,
        accum: int,
    ) -> None:
        self.cfg = cfg
        self.info = info
        self.counts = counts
        self.logger = logger
        self.accum = accum
        self.num_moe = num_moe_layers(cfg)
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.trainer.seq_length
        self.monitor = (
            HealthMonitor(model, info.ep_rank, info.device) if cfg.logging.health_metrics else None
        )
        self.gpu_flops = self._gpu_flops(model)
        comm_stats.install()
        comm_stats.take()
        self.stragglers = StragglerReport(info.world_size, info.device, info.is_main)
        get_moe_layer_wise_logging_tracker().clear()  # a global: start from nothing tracked
        clear_mtp_loss()  # likewise (forwards before the first step track their MTP loss)
        self.interval = IntervalStats()

    def _gpu_flops(self, model: torch.nn.Module) -> tuple[float | None, float] | None:
        """(peak TFLOP/s, FLOPs per token) for the MFU estimate; None off GPU."""
        if self.info.device.type != "cuda":
            return None
        t, m = self.cfg.trainer, self.cfg.model
        peak = self.cfg.logging.peak_tflops or peak_tflops(
            torch.cuda.get_device_name(), t.precision
        )
        vocab_size = getattr(model, "module", model).vocab_size
        per_token = training_flops_per_token(m, self.counts.activated_moe, vocab_size, t.seq_length)
        torch.cuda.reset_peak_memory_stats()
        return peak, per_token

    @contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, saving); its exchanges not training's."""
        start = time.perf_counter()
        self.interval.collective_s += self.stragglers.collective_seconds()
        # The interval's auxiliary losses so far survive the pause; what ran inside does not
        # count (clearing them here dropped all but the last step of each interval).
        tracker = get_moe_layer_wise_logging_tracker()
        kept = {name: entry["values"].clone() for name, entry in tracker.items()}
        try:
            yield
        finally:
            for name, entry in tracker.items():
                if name in kept:
                    entry["values"].copy_(kept[name])
                else:
                    entry["values"].zero_()
            comm_stats.take()
            self.stragglers.collective_seconds()  # not the steps' waits
            self.interval.start += time.perf_counter() - start

    def logs_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` ends a log interval (and the last step does)."""
        t = self.cfg.trainer
        return step % t.log_interval == 0 or step == t.steps

    def before_step(self, step: int) -> None:
        """Optimizer step ``step`` is next: the health monitor reads its activations only if it
        will be logged (between logs: the counts alone)."""
        if self.monitor is not None:
            self.monitor.sample(self.logs_at(step))

    def step_done(self, state, result, lr: float, nonfinite_total: int = 0) -> dict | None:
        """Count the step (its StepResult) that took the loop to ``state`` (a TrainState); log
        and return the interval's record when it is due."""
        if math.isfinite(result.loss):
            self.interval.loss += result.loss
            self.interval.finite_losses += 1
        if not result.applied:
            self.interval.skipped += 1
        self.interval.steps += 1
        self.interval.a2a_bytes += comm_stats.take()[0]
        step = state.step
        if not self.logs_at(step):
            return None
        record = self._record(step, result.grad_norm, lr)
        record["consumed_samples"] = state.consumed_samples
        record["skipped_steps"] = self.interval.skipped
        record["nonfinite_steps_total"] = nonfinite_total
        self.logger.log(record, echo=format_train_record(record))
        self.interval = IntervalStats()
        return record

    def _record(self, step: int, grad_norm: float, lr: float) -> dict:
        interval = self.interval
        elapsed = time.perf_counter() - interval.start
        aux = read_aux_losses(
            get_moe_layer_wise_logging_tracker(), self.num_moe, interval.steps * self.accum
        )
        clear_aux_losses_tracker()
        mtp_loss = read_mtp_loss(self.cfg.model.mtp_num_layers, interval.steps * self.accum)
        record = {
            "step": step,
            # The mean over finite losses (None when no step of the interval had one).
            "loss": interval.loss / interval.finite_losses if interval.finite_losses else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": interval.steps * self.tokens_per_step / elapsed,
            # megatron's balancing loss of whichever kind the recipe uses, and its z-loss
            "aux_loss": next((aux[k] for k in AUX_LOSS_NAMES if k in aux), None),
            "z_loss": aux.get("z_loss"),
            "ng_lbl": aux.get("ng_lbl"),
            "mtp_loss": mtp_loss,  # multi-token prediction, unscaled (model.mtp_num_layers)
            # Expert-parallel token exchange of the whole job per step (0 at EP = 1).
            "a2a_bytes": job_total(interval.a2a_bytes, self.info) / interval.steps,
            # Activated parameters per token, both ways (docs/method.md): MoE routing alone, and
            # with the neuron top-k.
            "params/activated_moe": self.counts.activated_moe,
            "params/activated": self.counts.activated,
        }
        if self.monitor is not None:
            record.update(self.monitor.collect())
        waits = interval.collective_s + self.stragglers.collective_seconds()
        record.update(self.stragglers.collect(elapsed, waits, interval.steps))
        if self.gpu_flops is not None:
            peak, per_token = self.gpu_flops
            per_gpu = record["tokens_per_s"] * per_token / self.info.world_size
            record["mfu"] = per_gpu / (peak * 1e12) if peak else None
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return record

    def close(self) -> None:
        """Detach the health hooks."""
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None


def job_total(value: float, info: DistInfo) -> float:
    """Sum of a per-rank number over all ranks."""
    if info.world_size == 1:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(total)
    return float(total)


# megatron-core's tracker names of its balancing losses (model.load_balancing: aux_loss,
# seq_aux_loss, global_aux_loss), logged unscaled as "aux_loss".
AUX_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")


def read_aux_losses(tracker: dict, num_moe: int, num_forwards: int) -> dict[str, float]:
    """Mean over MoE layers and forward passes of each tracked auxiliary loss, job-wide.

    A rank's tracked value of a layer is its share of the layer's loss over the group megatron
    names as the entry's ``reduce_group`` (its tensor-parallel ranks for the balancing losses:
    their sum is the loss), else the loss itself. Summing ``value x |reduce group|`` over all
    ranks and dividing by the ranks that hold the layer (world / pipeline stages) is therefore
    the mean over data-parallel replicas at any layout, with one all-reduce per loss.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {name: float(entry["values"].float().sum()) / num_moe / max(1, num_forwards)
                for name, entry in tracker.items()}  # fmt: skip
    from megatron.core import parallel_state

    stages = parallel_state.get_pipeline_model_parallel_world_size()
    names = sorted(tracker)
    if stages > 1:  # a stage may hold no layer that tracks a loss: agree on the names first
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = sorted(set().union(*every))
    holders = dist.get_world_size() // stages
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda() else None
    out = {}
    for name in names:
        entry = tracker.get(name)
        group = entry.get("reduce_group") if entry else None
        share = dist.get_world_size(group) if group is not None else 1
        values = (
            entry["values"].float() * share
            if entry is not None
            else torch.zeros(1, dtype=torch.float32, device=device)
        )
        total = values.sum().reshape(1).to(torch.float64)
        dist.all_reduce(total)
        out[name] = float(total) / holders / num_moe / max(1, num_forwards)
    return out


def clear_mtp_loss() -> None:
    """Zero megatron's multi-token prediction loss tracker (it exists after the first MTP
    forward only; evaluation forwards, in eval mode, add nothing to it)."""
    values = MTPLossLoggingHelper.tracker.get("values")
    if values is not None:
        values.zero_()


def read_mtp_loss(num_mtp_layers: int, num_forwards: int) -> float | None:
    """Mean multi-token prediction loss over MTP layers and forward passes, job-wide (None
    without MTP). megatron's tracker adds each micro batch's per-token loss of each MTP layer
    on the last pipeline stage, the same on its tensor-parallel ranks: the sum over all ranks
    divided by the ranks that hold the layers (world / pipeline stages) is the mean over
    data-parallel replicas. Clears the tracker."""
    if not num_mtp_layers:
        return None
    from megatron.core import parallel_state

    values = MTPLossLoggingHelper.tracker.get("values")
    total = float(values.float().sum()) if values is not None else 0.0
    clear_mtp_loss()
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda() else None
        summed = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        stages = parallel_state.get_pipeline_model_parallel_world_size()
        total = float(summed) / (dist.get_world_size() // stages)
    return total / num_mtp_layers / max(1, num_forwards)


_OPTIONAL_FIELDS = (  # (record key, label, format) shown on the log line when present
    ("aux_loss", "aux", ".4f"),
    ("z_loss", "z", ".4f"),
    ("ng_lbl", "ng_lbl", ".4f"),
    ("mtp_loss", "mtp", ".4f"),
    ("load/imbalance", "load max/mean", ".2f"),
    ("neurons/utilisation", "neuron util", ".3f"),
    ("gate_abs/q50", "|g| median", ".3g"),
    ("mfu", "MFU", ".1%"),
)


def format_train_record(record: dict) -> str:
    """The terminal line of one training record."""
    parts = [
        f"step {record['step']:>6}",
        f"loss {_number(record['loss'], '.4f')}",
        f"lr {record['lr']:.2e}",
        f"grad_norm {_number(record['grad_norm'], '.3f')}",
        f"tok/s {record['tokens_per_s']:,.0f}",
    ]
    for key, label, spec in _OPTIONAL_FIELDS:
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:{spec}}")
    if record.get("straggler/rank") is not None:  # the slowest rank's compute time / median
        parts.append(f"slowest rank {record['straggler/rank']} {record['straggler/ratio']:.2f}x")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']} (non-finite)")
    if record.get("peak_memory_gib") is not None:
        parts.append(f"mem {record['peak_memory_gib']:.1f} GiB")
    return " | ".join(parts)


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}"
