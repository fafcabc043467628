"""Named validation sets (``evaluation.sets``): each a dataset prefix or a blend of prefixes,
all of it held-out data, read as megatron-core GPTDatasets like the training data."""

from __future__ import annotations

from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset

from mone_train.data.dataset import DataError, check_prefixes, dataset_config, index_cache_for
from mone_train.evaluation.errors import EvaluationError


def set_prefixes(name: str, source) -> list[str]:
    """The expanded prefixes of set ``name``; each must have its .bin and .idx."""
    raw = [source] if isinstance(source, str) else list(source)
    prefixes = []
    for prefix in raw:
        path = Path(prefix).expanduser()
        for suffix in (".bin", ".idx"):
            if not path.with_name(path.name + suffix).is_file():
                raise EvaluationError(
                    f"evaluation.sets.{name}={source!r}: {path}{suffix} does not exist (expected "
                    "dataset prefixes written by mone-preprocess: PREFIX.bin and PREFIX.idx)"
                )
        prefixes.append(str(path))
    return prefixes


def check_sets(sets: dict) -> dict[str, list[str]]:
    """Every set's prefixes, checked for existence (before any process group starts)."""
    return {name: set_prefixes(name, source) for name, source in sets.items()}


def build_validation_set(
    name: str, prefixes: list[str], tokenizer, seq_length: int, seed: int, num_samples: int,
    cache_dir: str | Path,
):  # fmt: skip
    """A GPTDataset of ``num_samples`` sequences over all of ``prefixes`` (blended in proportion
    to their sizes); every rank calls this (torch.distributed must be up)."""
    try:
        check_prefixes(prefixes, tokenizer)
    except DataError as err:  # name the evaluation key, not data.paths
        raise EvaluationError(f"evaluation.sets.{name}: {err}") from None
    config = dataset_config(
        tokenizer, seq_length, seed, index_cache_for(Path(cache_dir), prefixes),
        blend_per_split=[None, (prefixes, None), None],
    )  # fmt: skip
    _, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [None, num_samples, None], lambda: True, config
    ).build()
    return valid
