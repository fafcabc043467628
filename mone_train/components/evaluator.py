"""The trainer's evaluation component: held-out loss on a fixed set of batches."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mone_train.config import TrainerConfig
from mone_train.data.dataset import micro_batches
from mone_train.model.lm import lm_loss
from mone_train.parallel.pipeline import Pipeline
from mone_train.parallel.process_groups import DistInfo


class Evaluator:
    """Mean LM loss (nats per token) over the first ``eval_iters`` micro batches of a split.

    Every call reads the same batches, so successive validation losses are comparable.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainerConfig,
        info: DistInfo,
        mask: torch.Tensor,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.info = info
        self.mask = mask
        self.pipeline = pipeline  # with pipeline stages: megatron's schedule, forward only

    def due(self, step: int) -> bool:
        """Whether the schedule evaluates after optimizer step ``step`` (and after the last)."""
        return step % self.cfg.eval_interval == 0 or step == self.cfg.steps

    @torch.no_grad()
    def evaluate(self, dataset) -> float:
        """The loss on ``dataset`` over all data-parallel ranks; the model is left in train mode."""
        info = self.info
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=info.device)
        batches = micro_batches(dataset, 0, self.cfg.micro_batch_size, info.dp_rank, info.dp_size)
        if self.pipeline is not None:
            total = self.pipeline.run(batches, self.cfg.eval_iters, forward_only=True)
        else:
            for _ in range(self.cfg.eval_iters):
                loss_sum, count = lm_loss(self.model, next(batches), self.mask, info.device)
                total += torch.stack([loss_sum.double(), count.double()])
        # (tensor- and pipeline-parallel ranks hold the same sums: the ratio is unchanged)
        dist.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1])
