"""One optimizer step: micro batches -> DDP gradient buffers -> global norm and clipping -> AdamW.

Gradients accumulate in megatron-core's DDP buffers and are all-reduced there (megatron's
``finalize_model_grads``, which also moves the routers' expert biases of loss-free balancing);
the norm covers every expert of every rank; clipping and AdamW then act on the buffers. The
MoNE experts' neuron biases (``moe.neuron_balance=bias``) move after the counts of the step. A step whose loss or
gradient norm is not finite applies no update: weights and optimizer state stay as they were
(the trainer counts such steps and stops after too many in a row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from mone_train.components.optimizer import (
    OptimizerSharding,
    attach_main_grads,
    clip_grads_,
    copy_masters_to_params,
    detach_main_grads,
    global_grad_norm,
)
from mone_train.errors import TrainingDiverged
from mone_train.model.lm import lm_loss
from mone_train.model.neuron_balance import update_neuron_biases
from mone_train.parallel.pipeline import Pipeline
from mone_train.parallel.process_groups import DistInfo


class StepResult(NamedTuple):
    """The global batch's mean LM loss, the gradient norm before clipping, and whether the
    update was applied (False: the loss or the norm was not finite, weights untouched)."""

    loss: float
    grad_norm: float
    applied: bool = True


class TrainStep:
    """Callable that runs one optimizer step over ``accum`` micro batches.

    Args:
        model: the DDP-wrapped model (its buffers hold the gradients).
        optimizer: a torch optimizer over ``params`` that reads ``param.grad``.
        params: the trainable parameters.
        mask: the causal attention mask for the training sequence length.
        info: this process's place in the job.
        accum: micro batches per optimizer step on this rank.
        clip_grad: maximum global gradient norm (0 disables clipping).
        sharding: ZeRO-1 ownership (the optimizer then covers the owned weights only).
        on_phase: called with the phase the step enters (``data``, ``forward``, ``backward``,
            ``grad_sync``, ``optimizer``): the hang watchdog's progress reports.
        pipeline: with pipeline stages, the schedule that runs the micro batches.
    """

    def __init__(
        self,
        model,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        mask: torch.Tensor,
        info: DistInfo,
        *,
        accum: int,
        clip_grad: float,
        sharding: OptimizerSharding | None = None,
        on_phase: Callable[[str], None] | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.params = params
        self.mask = mask
        self.info = info
        self.accum = accum
        self.clip_grad = clip_grad
        self.sharding = sharding
        self.on_phase = on_phase or (lambda phase: None)
        # the weights this rank's optimizer updates (all of them without sharding)
        self.owned = params if sharding is None else sharding.owned
        self.dp_group = parallel_state.get_data_parallel_group()
        self.expert_dp_group = parallel_state.get_expert_data_parallel_group()
        # what the gradient norm adds up over (mone_train/components/optimizer.py: global_grad_norm)
        self.model_parallel_group = parallel_state.get_model_parallel_group()
        self.expert_model_parallel_group = (
            parallel_state.get_expert_tensor_model_pipeline_parallel_group()
        )
        # More than one pipeline stage: megatron's 1F1B schedule (mone_train/parallel/pipeline.py).
        self.pipeline = pipeline
        # megatron scales its auxiliary losses' gradients by this (the mean over micro batches;
        # its pipeline schedule sets the same again at every forward, as a [1] tensor). A
        # backward without a scale set leaves a [] one behind, which the schedule cannot
        # overwrite in place: start from a fresh [1] tensor.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=info.device) / accum)
        # the same for the multi-token prediction loss (model.mtp_num_layers)
        MTPLossAutoScaler.main_loss_backward_scale = None
        MTPLossAutoScaler.set_loss_scale(torch.ones(1, device=info.device) / accum)

    def __call__(self, batches: Iterator[dict], lr: float) -> StepResult:
        """Forward/backward ``accum`` micro batches from ``batches``, then step at ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.zero_grad_buffer()
        if self.pipeline is not None:
            step_loss = self.pipeline.run(batches, self.accum, forward_only=False)
        else:
            step_loss = self._forward_backward(batches)
        self.on_phase("grad_sync")
        finalize_model_grads([self.model])
        update_neuron_biases(self.model, self.expert_dp_group)
        if self.info.dp_size > 1:
            dist.all_reduce(step_loss, group=self.dp_group)  # the loss of the global batch
        grad_norm = global_grad_norm(
            self.params, self.model_parallel_group, self.expert_model_parallel_group,
            self.info.tp_rank, self.info.tp_size,
        )  # fmt: skip
        loss = float(step_loss[0] / step_loss[1])
        # Both numbers are job-wide (the loss comes from the last pipeline stage and is summed
        # over data-parallel ranks, the norm over model-parallel ranks on top of DDP's
        # all-reduce), so every rank decides alike.
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            return StepResult(loss, float(grad_norm), applied=False)
        self.on_phase("optimizer")
        clip_grads_(self.params, self.clip_grad, grad_norm)
        attach_main_grads(self.owned)
        self.optimizer.step()
        detach_main_grads(self.owned)
        copy_masters_to_params(self.owned)
        if self.sharding is not None:
            self.sharding.broadcast_weights()
        return StepResult(loss, float(grad_norm))

    def _forward_backward(self, batches: Iterator[dict]) -> torch.Tensor:
        """One stage: the micro batches one after another; [loss sum, token count]."""
        step_loss = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for _ in range(self.accum):
            self.on_phase("data")
            batch = next(batches)
            self.on_phase("forward")
            loss_sum, count = lm_loss(self.model, batch, self.mask, self.info.device)
            self.on_phase("backward")
            (loss_sum / count / self.accum).backward()
            step_loss += torch.stack([loss_sum.detach().double(), count.double()])
        return step_loss


class NonFiniteGuard:
    """Counts steps whose update was skipped; too many in a row stop the run.

    :meth:`count` every step, then :meth:`check`, which raises :class:`TrainingDiverged` after
    ``max_consecutive`` skipped steps in a row, naming the steps, what was not finite and the
    last good checkpoint.
    """

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.streak = 0  # consecutive skipped steps up to now
        self.total = 0  # skipped steps in this process

    def count(self, result: StepResult) -> None:
        """Account for one step's result."""
        if result.applied:
            self.streak = 0
        else:
            self.streak += 1
            self.total += 1

    def check(self, step: int, result: StepResult, last_good: Path | None) -> None:
        """Raise TrainingDiverged if the streak that ends at ``step`` (1-based) is too long."""
        if self.streak < self.max_consecutive:
            return
        what = "loss" if not math.isfinite(result.loss) else "gradient norm"
        raise TrainingDiverged(
            f"training diverged: non-finite {what} at steps {step - self.streak + 1}-{step} "
            f"({self.streak} updates skipped in a row, trainer.max_nonfinite_steps="
            f"{self.max_consecutive}); last good checkpoint: {last_good or 'none'}"
        )
