"""megatron-core GPT datasets over our indexed files, and the per-rank batch stream.

Sampling is by position: sample ``i`` of the (shuffled, seeded) GPTDataset is always the same
sequence, and a step reads the next ``global_batch_size`` positions, each data-parallel rank
taking its slice. The data position is therefore one integer (``consumed_samples``), which is
what a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig


def build_gpt_datasets(
    train_prefix: str,
    valid_prefix: str,
    tokenizer,
    seq_length: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int,
    cache_dir: str | Path,
) -> tuple[GPTDataset, GPTDataset]:
    """Train and validation GPTDatasets (all ranks call this; torch.distributed must be up)."""
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[([train_prefix], None), ([valid_prefix], None), None],
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir),
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, None], lambda: True, config
    ).build()
    return train, valid


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into ``[micro_batch, seq]`` tensors."""
    return {
        key: torch.stack([s[key] for s in samples])
        for key in ("tokens", "labels", "loss_mask", "position_ids")
    }


def micro_batches(
    dataset,
    start_sample: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of this rank's micro batches, starting at global sample ``start_sample``.

    Each round of ``dp_size`` micro batches covers ``micro_batch_size * dp_size`` consecutive
    samples; rank r takes the r-th block of ``micro_batch_size``.
    """
    position = start_sample
    stride = micro_batch_size * dp_size
    while True:
        first = position + dp_rank * micro_batch_size
        yield collate([dataset[(first + i) % len(dataset)] for i in range(micro_batch_size)])
        position += stride
