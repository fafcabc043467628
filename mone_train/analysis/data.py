"""Held-out tokens for the studies: a megatron-core indexed dataset or a text file, streamed.

Documents are read one piece at a time and concatenated (an indexed dataset already holds its
end-of-document tokens; a text file is one document), then cut into windows of
``seq_length + 1`` tokens that overlap by one token: inputs ``w[:-1]``, labels ``w[1:]``, so every
token after the first is predicted exactly once. At most ``max_tokens // seq_length`` windows are
read. Memory stays bounded by one piece of a document plus one batch, whatever the data size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mone_train.analysis.errors import AnalysisError

PIECE_TOKENS = 1 << 20  # documents are read in pieces of this many tokens
TEXT_BLOCK_CHARS = 1 << 20  # a text file is tokenized in blocks of whole lines about this long


@dataclass
class TokenSource:
    """Where tokens come from. ``pieces()`` starts a fresh pass over them."""

    option: str  # the command-line option that named it, for messages
    path: str
    pieces: Callable[[], Iterator[np.ndarray]]
    num_tokens: int | None  # known in advance for indexed data
    vocab_size_hint: int | None = None  # vocabulary recorded beside preprocessed data

    def describe(self) -> dict:
        """Summary for the result JSON."""
        kind = "indexed" if self.option == "--data" else "text"
        return {"source": kind, "path": self.path}


def indexed_source(prefix: str) -> TokenSource:
    """A megatron-core indexed dataset ``PREFIX.bin`` / ``PREFIX.idx``."""
    path = Path(prefix).expanduser()
    missing = [
        str(path.with_name(path.name + suffix))
        for suffix in (".bin", ".idx")
        if not path.with_name(path.name + suffix).is_file()
    ]
    if missing:
        raise AnalysisError(
            f"--data {prefix}: {' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} "
            "not exist (expected the prefix of a "
            "megatron-core indexed dataset: PREFIX.bin and PREFIX.idx)"
        )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        dataset = IndexedDataset(str(path))
    except Exception as err:  # a truncated or foreign file fails in many ways
        raise AnalysisError(f"--data {prefix}: not a readable indexed dataset ({err})") from None
    num_tokens = int(np.asarray(dataset.index.sequence_lengths, dtype=np.int64).sum())

    def pieces() -> Iterator[np.ndarray]:
        for i in range(len(dataset)):
            document = dataset[i]
            for start in range(0, len(document), PIECE_TOKENS):
                yield np.asarray(document[start : start + PIECE_TOKENS], dtype=np.int64)

    return TokenSource("--data", str(path), pieces, num_tokens, _recorded_vocab_size(path))


def _recorded_vocab_size(prefix: Path) -> int | None:
    """The tokenizer vocabulary written beside preprocessed data (``PREFIX.meta.json``), if any."""
    meta = prefix.with_name(prefix.name + ".meta.json")
    try:
        return int(json.loads(meta.read_text())["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def text_source(file: str, tokenize: Callable[[str], np.ndarray]) -> TokenSource:
    """A UTF-8 text file tokenized by ``tokenize`` (the model's own tokenizer)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise AnalysisError(f"--text {file}: no such file (expected a UTF-8 text file)")

    def pieces() -> Iterator[np.ndarray]:
        with open(path, encoding="utf-8", errors="replace") as f:
            block: list[str] = []
            size = 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= TEXT_BLOCK_CHARS:
                    yield np.asarray(tokenize("".join(block)), dtype=np.int64)
                    block, size = [], 0
            if block:
                yield np.asarray(tokenize("".join(block)), dtype=np.int64)

    return TokenSource("--text", str(path), pieces, None)


class Batches:
    """Batches ``[B, seq_length + 1]`` (int64) of windows from a source, checked against the
    model's vocabulary. Iterating starts a fresh pass."""

    def __init__(
        self,
        source: TokenSource,
        seq_length: int,
        batch_size: int,
        max_tokens: int,
        vocab_size: int,
    ) -> None:
        self.source = source
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.max_windows = max(1, max_tokens // seq_length)
        if source.num_tokens is not None:
            available = (source.num_tokens - 1) // seq_length
            if available < 1:
                raise AnalysisError(
                    f"{source.option} {source.path}: {source.num_tokens} tokens are too few for "
                    f"one sequence (need --seq-length + 1 = {seq_length + 1})"
                )
            self.max_windows = min(self.max_windows, available)
        hint = source.vocab_size_hint
        if hint is not None and hint > vocab_size:
            raise AnalysisError(
                f"{source.option} {source.path} was tokenized with a vocabulary of {hint}, larger "
                f"than the model's {vocab_size} (expected data made with the model's tokenizer)"
            )

    @property
    def max_batches(self) -> int:
        """Upper bound on the number of batches (exact for indexed data)."""
        return -(-self.max_windows // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        rows: list[np.ndarray] = []
        seen = 0
        for window in self._windows():
            rows.append(window)
            seen += 1
            if len(rows) == self.batch_size:
                yield self._checked(np.stack(rows))
                rows = []
        if rows:
            yield self._checked(np.stack(rows))
        if seen == 0:
            raise AnalysisError(
                f"{self.source.option} {self.source.path}: too few tokens for one sequence "
                f"(need --seq-length + 1 = {self.seq_length + 1})"
            )

    def _windows(self) -> Iterator[np.ndarray]:
        need = self.seq_length + 1
        buffer = np.empty(0, dtype=np.int64)
        count = 0
        for piece in self.source.pieces():
            buffer = np.concatenate([buffer, piece]) if len(buffer) else piece
            start = 0
            while len(buffer) - start >= need:
                yield buffer[start : start + need].copy()
                count += 1
                if count == self.max_windows:
                    return
                start += self.seq_length
            buffer = buffer[start:]

    def _checked(self, batch_BW: np.ndarray) -> np.ndarray:
        top, bottom = int(batch_BW.max()), int(batch_BW.min())
        if top >= self.vocab_size or bottom < 0:
            bad = top if top >= self.vocab_size else bottom
            raise AnalysisError(
                f"{self.source.option} {self.source.path}: token id {bad} is outside the model's "
                f"vocabulary of {self.vocab_size} (expected data made with the model's tokenizer)"
            )
        return batch_BW
