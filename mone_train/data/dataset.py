"""megatron-core GPT datasets over our indexed files, and the per-rank batch stream.

Sampling is by position: sample ``i`` of the (shuffled, seeded) GPTDataset is always the same
sequence, and a step reads the next ``global_batch_size`` positions, each data-parallel rank
taking its slice. The data position is therefore one integer (``consumed_samples``), which is
what a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from mone_train.errors import ConfigError, first_line


class DataError(ConfigError):
    """A dataset that cannot be used as configured; the message names the key and file."""


def _split_bounds(split: list[float], num_documents: int) -> list[tuple[int, int]]:
    """Document ranges of train/valid/test, as megatron-core cuts them (rounded bounds)."""
    total = float(sum(split))
    edges = [0.0]
    for share in split:
        edges.append(edges[-1] + share / total)
    return [
        (int(round(a * num_documents)), int(round(b * num_documents)))
        for a, b in zip(edges, edges[1:])
    ]


def _indexed_dataset_class():
    """megatron-core's IndexedDataset, whose clean-up tolerates a failed construction.

    Its ``__del__`` deletes attributes that ``__init__`` sets only on success, so an unreadable
    index made Python print an ``AttributeError`` traceback after our one-line error.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class CheckedIndexedDataset(IndexedDataset):
        def __del__(self) -> None:
            if "index" in self.__dict__ and "bin_reader" in self.__dict__:
                super().__del__()

    return CheckedIndexedDataset


def open_indexed(prefix: str, index: int, raw: str):
    """megatron-core's IndexedDataset of ``prefix``; a DataError naming the file when the
    index is unreadable or the .bin is shorter than the index says (truncated, or mixed up)."""
    where = f"data.paths[{index}]={raw!r}"
    try:
        dataset = _indexed_dataset_class()(prefix)
        pointers, lengths = dataset.index.sequence_pointers, dataset.index.sequence_lengths
        itemsize = np.dtype(dataset.index.dtype).itemsize
    except Exception as err:  # megatron asserts on the header, numpy fails on short files
        raise DataError(
            f"{where}: {prefix}.idx is not a readable megatron-core index ({first_line(err)}); "
            "re-create the dataset with mone-preprocess"
        ) from None
    needed = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    size = Path(prefix + ".bin").stat().st_size
    if size < needed:
        raise DataError(
            f"{where}: {prefix}.bin has {size} bytes but its index needs {needed} (truncated, or "
            "not the .bin this .idx was written with); re-create the dataset with mone-preprocess"
        )
    return dataset


def check_split(dataset, index: int, raw: str, split: list[float]) -> None:
    """Every split with a share must get at least one document of every dataset.

    (megatron-core loops forever building a GPTDataset over zero tokens.)
    """
    num_documents = len(dataset)
    for name, share, (begin, end) in zip(
        ("train", "valid", "test"), split, _split_bounds(split, num_documents)
    ):
        if share > 0 and end <= begin:
            raise DataError(
                f"data.paths[{index}]={raw!r} has {num_documents} documents, too few for "
                f"data.split={list(split)}: its {name} share gets none (add documents or "
                "raise that share)"
            )


def index_cache_for(base: Path, prefixes: list[str]) -> Path:
    """megatron-core keys its sample-index cache by path, not content: a dataset rewritten in
    place (``mone-preprocess --overwrite``) gets a fresh cache folder from its files' stamps."""
    import hashlib

    stamps = []
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            stat = Path(prefix + suffix).stat()
            stamps.append(f"{prefix}{suffix}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]
    return Path(base).expanduser() / digest


def check_prefixes(paths: list[str], tokenizer, split: list[float] | None = None) -> list[str]:
    """Expanded ``data.paths``; each must have .bin and .idx, made with this tokenizer, and
    enough documents for every split share."""
    from mone_train.data.preprocess import output_paths, read_meta

    checked = []
    for i, raw in enumerate(paths):
        prefix = str(Path(raw).expanduser())
        files = output_paths(prefix)
        for key in ("bin", "idx"):
            if not files[key].is_file():
                raise DataError(
                    f"data.paths[{i}]={raw!r}: {files[key]} does not exist "
                    "(expected a prefix written by mone-preprocess: PREFIX.bin and PREFIX.idx)"
                )
        meta = read_meta(prefix)
        if meta is not None:
            made_with, ours = meta.get("tokenizer", {}), tokenizer.describe()
            if made_with != ours:
                raise DataError(
                    f"data.paths[{i}]={raw!r} was tokenized with {_describe(made_with)}, "
                    f"but data.tokenizer is {_describe(ours)}"
                )
        dataset = open_indexed(prefix, i, raw)
        if split is not None:
            check_split(dataset, i, raw, split)
        del dataset
        checked.append(prefix)
    return checked


def _describe(tok: dict) -> str:
    digest = f", sha256 {tok['sha256']}" if "sha256" in tok else ""
    return f"{tok.get('kind')} (vocabulary {tok.get('vocab_size')}{digest})"


def dataset_config(tokenizer, seq_length: int, seed: int, cache_dir, **source) -> GPTDatasetConfig:
    """megatron-core's GPTDatasetConfig as every dataset of a run uses it (``source``: its
    ``blend`` or ``blend_per_split``)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir),
        **source,
    )


def build_blended_datasets(
    paths: list[str],
    weights: list[float] | None,
    split: list[float],
    tokenizer,
    seq_length: int,
    seed: int,
    sizes: tuple[int, int, int],
    cache_dir: str | Path,
):
    """Train, validation and test datasets (test None when its split share is 0) of a blend.

    ``weights`` None blends in proportion to the datasets' sizes (megatron-core's rule).
    """
    prefixes = check_prefixes(paths, tokenizer, list(split))
    config = dataset_config(
        tokenizer,
        seq_length,
        seed,
        index_cache_for(Path(cache_dir), prefixes),
        blend=(prefixes, None if weights is None else [float(w) for w in weights]),
        split=",".join(f"{float(share):g}" for share in split),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, list(sizes), lambda: True, config
    ).build()
    return train, valid, test


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
    config = dataset_config(
        tokenizer,
        seq_length,
        seed,
        cache_dir,
        blend_per_split=[([train_prefix], None), ([valid_prefix], None), None],
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
