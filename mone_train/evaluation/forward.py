"""The forward passes of an evaluation, on any layout.

Validation: the first ``num_samples`` sequences of a dataset, split over the data-parallel
ranks in micro batches; the sums (loss, tokens, bytes) are reduced over the job, so every layout
sees the same sequences and reports the same mean. Tasks: padded rows of ``context + target``,
scored row by row (the log-likelihood of the target's tokens and, when asked, whether each of
them is the argmax of its logits), each data-parallel rank taking its share and the results
gathered over the data-parallel group.

Every data-parallel rank runs the same number of forwards (rows are padded with empty ones),
which expert parallelism's all-to-all needs. With pipeline stages, megatron-core's schedule runs
the forwards (forward only) and the last stage broadcasts the results to the others.

Legend: B micro batch, S sequence length, R rows, V vocabulary (this tensor-parallel rank's part).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

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
        self._logits: torch.Tensor | None = None  # [S, B, V]: see _greedy_heads

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
    def row_scores(
        self, rows: list, micro_batch_size: int, seq_length: int, pad: int, greedy: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(the log-likelihood in nats of the last ``n`` tokens of each row ``(tokens, n)``
        given the tokens before them, and with ``greedy`` whether those ``n`` tokens are each
        the argmax of the model's logits, else None); every rank returns all of them."""
        info = self.info
        stride = micro_batch_size * info.dp_size
        padded = -(-max(len(rows), 1) // stride) * stride
        length = seq_length
        if self.pipeline is None:  # without fixed stage shapes: only as long as the rows
            tp = info.tp_size
            longest = max((len(row[0]) - 1 for row in rows), default=1)
            length = min(seq_length, -(-longest // tp) * tp)
        rounds = padded // stride
        batches = (
            _row_batch(rows, (k * info.dp_size + info.dp_rank) * micro_batch_size,
                       micro_batch_size, length, pad)
            for k in range(rounds)
        )  # fmt: skip
        with self._greedy_heads(greedy):
            mine = self._row_sums(batches, rounds, micro_batch_size, length)
        every = torch.zeros(rounds, info.dp_size, micro_batch_size, 3, dtype=torch.float64,
                            device=info.device)  # fmt: skip
        every[:, info.dp_rank] = mine.view(rounds, micro_batch_size, 3)  # this rank's rows
        dist.all_reduce(every, group=parallel_state.get_data_parallel_group())
        every = every.view(-1, 3)[: len(rows)].cpu().numpy()
        all_greedy = every[:, 2] == every[:, 1] if greedy else None
        return -every[:, 0], all_greedy

    @contextmanager
    def _greedy_heads(self, greedy: bool):
        """With ``greedy``: inside the block, each output layer's last logits are kept (the
        main head's: megatron runs the multi-token prediction heads before it) for
        :meth:`_sums` to read."""
        self._logits = None
        if not greedy:
            yield
            return

        def keep(module, args, output):
            self._logits = output[0]

        heads = [m.output_layer for m in self.model.modules()
                 if isinstance(m, GPTModel) and m.post_process]  # fmt: skip
        handles = [head.register_forward_hook(keep) for head in heads]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._logits = None

    def _row_sums(
        self, batches: Iterator[dict], rounds: int, micro_batch_size: int, length: int
    ) -> torch.Tensor:
        """[rounds x B, 3] (loss sum, tokens, greedy tokens) per row of ``rounds`` micro batches;
        the same on every pipeline stage."""
        device = self.info.device
        mask = causal_mask(length, device)
        if self.pipeline is None:
            sums = [self._sums(self.model(*_inputs(b, device), mask, labels=_labels(b, device),
                                          loss_mask=_loss_mask(b, device)), b)
                    for _, b in zip(range(rounds), batches)]  # fmt: skip
            return torch.cat(sums) if sums else torch.zeros(0, 3, device=device)
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
                rows = self._sums(per_token_BS, batch)
                return rows[:, 0].sum(), rows[:, 1].sum().int(), {"rows": rows}

            return output, loss

        reports = pipeline.schedule(
            forward_step_func=forward_step, data_iterator=batches, model=[pipeline.model],
            num_microbatches=rounds, seq_length=length, micro_batch_size=micro_batch_size,
            forward_only=True,
        )  # fmt: skip
        sums = torch.zeros(rounds * micro_batch_size, 3, dtype=torch.float64, device=device)
        if last and reports:
            sums.copy_(torch.cat([r["rows"] for r in reports]))
        dist.broadcast(sums, src=pipeline.last_rank, group=pipeline.pp_group)
        return sums

    def _sums(self, per_token_BS: torch.Tensor, batch: dict) -> torch.Tensor:
        """[B, 3]: each row's masked loss sum, its number of scored tokens and how many of
        them are the argmax of their logits (0 unless :meth:`_greedy_heads` kept logits)."""
        device = self.info.device
        loss_mask_BS = _loss_mask(batch, device).double()
        greedy_BS = torch.zeros_like(loss_mask_BS)
        if self._logits is not None:
            greedy_BS = _is_argmax(self._logits, _labels(batch, device), self.info).double()
        return torch.stack([(per_token_BS.double() * loss_mask_BS).sum(1), loss_mask_BS.sum(1),
                            (greedy_BS * loss_mask_BS).sum(1)], 1)  # fmt: skip


def _inputs(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["tokens"].to(device), batch["position_ids"].to(device)


def _labels(batch: dict, device) -> torch.Tensor:
    return batch["labels"].to(device)


def _loss_mask(batch: dict, device) -> torch.Tensor:
    """The scored positions (also what weighs a multi-token-prediction loss inside the model)."""
    return batch["loss_mask"].to(device).float()


def _is_argmax(logits_SBV: torch.Tensor, labels_BS: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[B, S] bool: each label is the argmax of its logits over the whole vocabulary (the first
    index among equal maxima, as ``torch.argmax``), the vocabulary split over tensor-parallel
    ranks in order."""
    index_SB = logits_SBV.argmax(-1)
    value_SB = logits_SBV.gather(-1, index_SB[..., None])[..., 0].float()
    index_SB = index_SB + info.tp_rank * logits_SBV.shape[-1]
    if info.tp_size > 1:  # the best rank's index; among equal maxima the first rank's
        group = parallel_state.get_tensor_model_parallel_group()
        values = [torch.empty_like(value_SB) for _ in range(info.tp_size)]
        indices = [torch.empty_like(index_SB) for _ in range(info.tp_size)]
        dist.all_gather(values, value_SB, group=group)
        dist.all_gather(indices, index_SB, group=group)
        best_SB = torch.stack(values).argmax(0)
        index_SB = torch.stack(indices).gather(0, best_SB[None])[0]
    return index_SB.t() == labels_BS


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
    """Micro batch of rows ``first ..`` (each ``(tokens, num_scored)``): inputs, labels and
    a loss mask over the scored tokens (rows past the end are empty: all masked)."""
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
