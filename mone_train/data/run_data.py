"""The tokenizer and datasets one training run reads, built as its config says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from mone_train.config import Config
from mone_train.data.corpus import prepare_stdlib_corpus
from mone_train.data.dataset import build_blended_datasets, build_gpt_datasets
from mone_train.data.tokenizer import tokenizer_from_config
from mone_train.parallel.process_groups import DistInfo


@dataclass
class RunData:
    """Tokenizer and (train, valid, test) datasets; ``test`` is None without a test split."""

    tokenizer: object
    train: object
    valid: object
    test: object | None


def build_run_data(cfg: Config, info: DistInfo, num_samples: tuple[int, int, int]) -> RunData:
    """Build what the run reads; ``num_samples`` are (train, valid, test) sample counts.

    The main rank builds what has to be built (the default corpus, megatron's sample indices)
    before the other ranks read it.
    """
    d, t = cfg.data, cfg.trainer
    tokenizer = tokenizer_from_config(d.tokenizer)
    if d.name == "stdlib":
        if info.is_main:
            corpus = prepare_stdlib_corpus(d.cache_dir, d.valid_every, tokenizer)
        dist.barrier()
        if not info.is_main:
            corpus = prepare_stdlib_corpus(d.cache_dir, d.valid_every, tokenizer)
        cache = d.index_cache_dir or Path(corpus.train_prefix).parent / "index-cache"

        def build(seed: int):
            return build_gpt_datasets(
                corpus.train_prefix,
                corpus.valid_prefix,
                tokenizer,
                t.seq_length,
                seed,
                num_train_samples=num_samples[0],
                num_valid_samples=num_samples[1],
                cache_dir=Path(cache).expanduser(),
            ) + (None,)
    else:
        cache = Path(d.index_cache_dir or Path(d.cache_dir) / "index-cache").expanduser()

        def build(seed: int):
            return build_blended_datasets(
                list(d.paths),
                None if d.weights is None else list(d.weights),
                d.split,
                tokenizer,
                t.seq_length,
                seed,
                num_samples,
                cache,
            )

    train, valid, test = build(t.seed)
    if d.eval_seed is not None and d.eval_seed != t.seed:
        # The held-out samples (and their order) drawn with their own seed: runs that differ
        # only in trainer.seed are evaluated on the same tokens.
        _, valid, test = build(d.eval_seed)
    return RunData(tokenizer, train, valid, test)
