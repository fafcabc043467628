"""The forward passes of an evaluation, on any layout.

Validation: the first ``num_samples`` sequences of a dataset, split over the data-parallel
ranks in micro batches; the sums (loss, tokens, bytes) are reduced over the job, so every layout
sees the same sequences and reports the same mean. Tasks: padded rows of ``context + choice``,
scored row by row (the log-likelihood of the choice's tokens), each data-parallel rank taking
its share and the results gathered over the data-parallel group.

Every data-parallel rank runs the same number of forwards (rows are padded with empty ones),
which expert parallelism's all-to-all needs. With pipeline stages, megatron-core's schedule runs
the forwards (forward only) and the last stage broadcasts the results to the others.

Legend: B micro batch, S sequence length, R rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mone_train.data.dataset import micro_batches
from mone_train.model.lm import causal_mask
from mone_train.parallel.pipeline import Pipeline
from mone_train.parallel.process_groups import DistInfo

BYTE_VOCAB = 256  # byte-tokenizer ids below this are one byte of text each


class Forward:
    """Runs a model (or its pipeline stage) forward only, as evaluation needs it."""

    def __init__(self, model: torch.nn.Module, info: DistInfo, pipeline: Pipeline | None = None):
        self.model = model
        self.info = info
        self.pipeline = pipeline

    @torch.no_grad()
    def dataset_sums(
        self, dataset, num_samples: int, micro_batch_size: int, count_bytes: bool
    ) -> torch.Tensor:
        """[loss sum in nats, predicted tokens, their bytes (0 without ``count_bytes``)] of the
        first ``num_samples`` sequences of ``dataset``, the same on every rank."""
        info = self.info
        stride = micro_batch_size * info.dp_size
        assert num_samples % stride == 0, (num_samples, stride)  # the config's batch rule
        rounds = num_samples // stride
        seen = torch.zeros(1, dtype=torch.float64)
        batches = _counting_bytes(
            micro_batches(dataset, 0, micro_batch_size, info.dp_rank, info.dp_size),
            seen if count_bytes else None,
        )
        per_row = self._row_sums(batches, rounds, micro_batch_size, _seq_length(dataset))
        total = torch.stack([per_row[:, 0].sum(), per_row[:, 1].sum(), seen[0].to(info.device)])
        # tensor- and pipeline-parallel peers hold the same sums: reduce over data parallel only
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total.cpu()

    @torch.no_grad()
    def row_loglikelihoods(
        self, rows: list[tuple[np.ndarray, int]], micro_batch_size: int, seq_length: int, pad: int
    ) -> np.ndarray:
        """The log-likelihood (nats) of the last ``n`` tokens of each row ``(tokens, n)``, given
        the tokens before them; every rank returns all of them."""
        info = self.info
        stride = micro_batch_size * info.dp_size
        padded = -(-max(len(rows), 1) // stride) * stride
        length = seq_length
        if self.pipeline is None:  # without fixed stage shapes: only as long as the rows
            tp = info.tp_size
            longest = max((len(tokens) - 1 for tokens, _ in rows), default=1)
            length = min(seq_length, -(-longest // tp) * tp)
        rounds = padded // stride
        batches = (
            _row_batch(rows, (k * info.dp_size + info.dp_rank) * micro_batch_size,
                       micro_batch_size, length, pad)
            for k in range(rounds)
        )  # fmt: skip
        mine = self._row_sums(batches, rounds, micro_batch_size, length)[:, 0]
        every = torch.zeros(rounds, info.dp_size, micro_batch_size, dtype=torch.float64,
                            device=info.device)  # fmt: skip
        every[:, info.dp_rank] = mine.view(rounds, micro_batch_size)  # this rank's rows
        dist.all_reduce(every, group=parallel_state.get_data_parallel_group())
        return -every.flatten()[: len(rows)].cpu().numpy()

    def _row_sums(
        self, batches: Iterator[dict], rounds: int, micro_batch_size: int, length: int
    ) -> torch.Tensor:
        """[rounds x B, 2] (loss sum, tokens) per row of ``rounds`` micro batches; the same on
        every pipeline stage."""
        device = self.info.device
        mask = causal_mask(length, device)
        if self.pipeline is None:
            sums = [_sums(self.model(*_inputs(b, device), mask, labels=_labels(b, device),
                                     loss_mask=_loss_mask(b, device)), b, device)
                    for _, b in zip(range(rounds), batches)]  # fmt: skip
            return torch.cat(sums) if sums else torch.zeros(0, 2, device=device)
        return self._pipeline_row_sums(batches, rounds, micro_batch_size, length, mask)

    def _pipeline_row_sums(self, batches, rounds, micro_batch_size, length, mask):
        pipeline, device = self.pipeline, self.info.device
        last = self.info.last_stage

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            labels = _labels(batch, device) if last else None
            output = model(*_inputs(batch, device), mask, labels=labels,
                           loss_mask=_loss_mask(batch, device))  # fmt: skip

            def loss(per_token_BS):
                rows = _sums(per_token_BS, batch, device)
                return rows[:, 0].sum(), rows[:, 1].sum().int(), {"rows": rows}

            return output, loss

        reports = pipeline.schedule(
            forward_step_func=forward_step, data_iterator=batches, model=[pipeline.model],
            num_microbatches=rounds, seq_length=length, micro_batch_size=micro_batch_size,
            forward_only=True,
        )  # fmt: skip
        sums = torch.zeros(rounds * micro_batch_size, 2, dtype=torch.float64, device=device)
        if last and reports:
            sums.copy_(torch.cat([r["rows"] for r in reports]))
        dist.broadcast(sums, src=pipeline.last_rank, group=pipeline.pp_group)
        return sums


def _inputs(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["tokens"].to(device), batch["position_ids"].to(device)


def _labels(batch: dict, device) -> torch.Tensor:
    return batch["labels"].to(device)


def _loss_mask(batch: dict, device) -> torch.Tensor:
    """The scored positions (also what weighs a multi-token-prediction loss inside the model)."""
    return batch["loss_mask"].to(device).float()


def _sums(per_token_BS: torch.Tensor, batch: dict, device) -> torch.Tensor:
    """[B, 2]: each row's masked loss sum and its number of scored tokens (float64)."""
    loss_mask_BS = _loss_mask(batch, device).double()
    return torch.stack([(per_token_BS.double() * loss_mask_BS).sum(1), loss_mask_BS.sum(1)], 1)


def _seq_length(dataset) -> int:
    return int(dataset[0]["tokens"].shape[0])


def _counting_bytes(batches: Iterator[dict], seen: torch.Tensor | None) -> Iterator[dict]:
    """``batches`` unchanged; with ``seen``, adds the bytes of their scored byte-token labels."""
    for batch in batches:
        if seen is not None:
            scored = (batch["labels"] < BYTE_VOCAB) & (batch["loss_mask"] > 0)
            seen += scored.sum()
        yield batch


def _row_batch(rows, first: int, micro_batch_size: int, length: int, pad: int) -> dict:
    """Micro batch of rows ``first ..``: inputs, labels and a loss mask over the scored tokens
    (rows past the end are empty: all masked)."""
    tokens = torch.full((micro_batch_size, length), pad, dtype=torch.long)
    labels = torch.zeros((micro_batch_size, length), dtype=torch.long)
    loss_mask = torch.zeros((micro_batch_size, length), dtype=torch.float32)
    for i in range(micro_batch_size):
        if first + i >= len(rows):
            break
        ids, num_scored = rows[first + i]
        ids = torch.from_numpy(ids[-(length + 1) :])
        n = len(ids) - 1
        tokens[i, :n] = ids[:-1]
        labels[i, :n] = ids[1:]
        loss_mask[i, n - min(num_scored, n) : n] = 1.0
    position_ids = torch.arange(length).expand(micro_batch_size, length).contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
    }
