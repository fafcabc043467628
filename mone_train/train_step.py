"""One optimizer step: micro batches -> DDP gradient buffers -> global norm and clipping -> AdamW.

Gradients accumulate in megatron-core's DDP buffers and are all-reduced there; the norm covers
every expert of every rank; clipping and AdamW then act on the buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from mone_train.distributed import DistInfo
from mone_train.model.lm import lm_loss
from mone_train.optim import attach_main_grads, clip_grads_, detach_main_grads, global_grad_norm


class StepResult(NamedTuple):
    """The global batch's mean LM loss and the gradient norm before clipping."""

    loss: float
    grad_norm: float


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
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.params = params
        self.mask = mask
        self.info = info
        self.accum = accum
        self.clip_grad = clip_grad
        self.dp_group = parallel_state.get_data_parallel_group()
        self.ep_group = parallel_state.get_expert_model_parallel_group()
        # megatron scales its auxiliary losses' gradients by this (the mean over micro batches).
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / accum, device=info.device))

    def __call__(self, batches: Iterator[dict], lr: float) -> StepResult:
        """Forward/backward ``accum`` micro batches from ``batches``, then step at ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.zero_grad_buffer()
        step_loss = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for _ in range(self.accum):
            loss_sum, count = lm_loss(self.model, next(batches), self.mask, self.info.device)
            (loss_sum / count / self.accum).backward()
            step_loss += torch.stack([loss_sum.detach().double(), count.double()])
        self.model.finish_grad_sync()
        if self.info.dp_size > 1:
            dist.all_reduce(step_loss, group=self.dp_group)  # the loss of the global batch
        grad_norm = global_grad_norm(self.params, self.ep_group)
        clip_grads_(self.params, self.clip_grad, grad_norm)
        attach_main_grads(self.params)
        self.optimizer.step()
        detach_main_grads(self.params)
        return StepResult(float(step_loss[0] / step_loss[1]), float(grad_norm))
