"""Pipeline parallelism: megatron-core's schedules over this rank's stage of the model.

With ``trainer.pipeline_parallel_size`` P > 1 each rank builds one stage (``num_layers / P``
consecutive layers; the embedding on the first stage, the final norm, output layer and loss on
the last, with the multi-token prediction block and its copy of the embedding when
``model.mtp_num_layers`` > 0) and megatron-core's non-interleaved 1F1B schedule moves the
micro batches through the stages: P - 1 warm-up forwards, then one forward and one backward
in turn, then the cool-down backwards, so at most P micro batches' activations are alive on a
stage. Every stage reads the same micro batches (the first needs the tokens, the last the
labels), which keeps the data position identical on all ranks for checkpoints.

The loss is megatron's "per micro batch, then mean over micro batches" form (the same as the
single-stage step in ``train_step.py``), and MoE auxiliary losses stay inside each stage's
backward (megatron scales them by 1 / micro batches). Forward-only runs (evaluation) use the
same schedule without the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mone_train.parallel.process_groups import DistInfo


class Pipeline:
    """Runs micro batches through the stages; returns the LM loss sum and token count.

    Args:
        model: this stage's DDP-wrapped GPTModel.
        mask: the causal attention mask for ``seq_length``.
        info: this process's place in the job.
        seq_length, micro_batch_size: the shape of the tensors sent between stages.
        on_phase: progress reports (``data``, ``forward``, ``backward``) for the watchdog.
    """

    def __init__(
        self,
        model,
        mask: torch.Tensor,
        info: DistInfo,
        seq_length: int,
        micro_batch_size: int,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.mask = mask
        self.info = info
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.on_phase = on_phase or (lambda phase: None)
        self.schedule = get_forward_backward_func()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()

    def run(self, batches: Iterator[dict], num_micro_batches: int, forward_only: bool):
        """[loss sum, token count] (float64) of ``num_micro_batches`` micro batches, the same on
        every stage; with ``forward_only=False`` the gradients are in the DDP buffers."""
        reports = self.schedule(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[self.model],
            num_microbatches=num_micro_batches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )
        total = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for report in reports if self.info.last_stage else ():
            total += report["lm"]
        dist.broadcast(total, src=self.last_rank, group=self.pp_group)
        return total

    def _forward_step(self, data_iterator, model):
        device = self.info.device
        self.on_phase("data")
        batch = next(data_iterator)
        self.on_phase("forward")
        tokens_BS = batch["tokens"].to(device, non_blocking=True)
        position_ids_BS = batch["position_ids"].to(device, non_blocking=True)
        labels_BS = batch["labels"].to(device, non_blocking=True) if self.info.last_stage else None
        loss_mask_BS = batch["loss_mask"].to(device, non_blocking=True).float()
        output = model(tokens_BS, position_ids_BS, self.mask, labels=labels_BS,
                       loss_mask=loss_mask_BS)  # fmt: skip
        if output.requires_grad:  # the backward of this micro batch starts at its output
            output.register_hook(self._backward_started)
        return output, partial(_loss, loss_mask_BS)

    def _backward_started(self, grad):
        self.on_phase("backward")
        return grad


def _loss(loss_mask_BS: torch.Tensor, per_token_BS: torch.Tensor):
    """megatron's loss-function triple: (loss sum, tokens, what to report). The schedule
    divides the sum by the tokens and by the number of micro batches."""
    loss_sum = (per_token_BS.float() * loss_mask_BS).sum()
    count = loss_mask_BS.sum()
    report = torch.stack([loss_sum.detach().double(), count.double()])
    return loss_sum, count.int(), {"lm": report}
