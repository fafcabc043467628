"""A byte-level BPE tokenizer trained offline (``mone-tokenizer train``, ``data/cli.py``).

    mone-tokenizer train --stdlib --vocab-size 4096 --output stdlib-bpe.json
    mone-tokenizer train --input corpus/ dump.jsonl.gz --vocab-size 32000 --output tok.json
    mone-tokenizer info --type hf tok.json

``train`` reads the same inputs as ``mone-preprocess`` (``.txt`` files are documents, JSONL
lines hold the text under ``--json-key``), or the default corpus's training documents with
``--stdlib``, and trains Hugging Face ``tokenizers``' BPE over UTF-8 bytes (GPT-2 style byte-level
pre-tokenizer, so every string is encodable) with ``<|endoftext|>`` (end of document) and
``<pad>`` as special tokens. The result is one ``tokenizer.json`` file, used in training with
``data.tokenizer.type=hf data.tokenizer.path=FILE``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mone_train.data.preprocess import (
    PreprocessError,
    Stats,
    decode_record,
    read_records,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the specials, one merge


def _texts(files: list[Path], json_key: str, skip_bad_lines: bool, stats: Stats):
    for record in read_records(files, stats):
        text, problem, _ = decode_record(record, json_key)
        if text is None:
            if not skip_bad_lines:
                raise PreprocessError(f"{problem} (--skip-bad-lines skips such lines)")
            stats.skipped_lines += 1
            continue
        if text:
            stats.documents += 1
            yield text


def train_bpe(
    files: list[Path],
    output: str | Path,
    vocab_size: int,
    *,
    json_key: str = "text",
    min_frequency: int = 2,
    skip_bad_lines: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train a byte-level BPE tokenizer on ``files`` and write it to ``output`` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise PreprocessError(f"--vocab-size={vocab_size}: expected an integer >= {MIN_VOCAB}")
    if min_frequency < 1:
        raise PreprocessError(f"--min-frequency={min_frequency}: expected an integer >= 1")
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise PreprocessError(f"output {output} already exists (pass --overwrite to replace it)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    stats = Stats()
    start = time.perf_counter()
    tokenizer.train_from_iterator(_texts(files, json_key, skip_bad_lines, stats), trainer=trainer)
    if stats.documents == 0:
        raise PreprocessError(f"no documents found in {', '.join(str(f) for f in files[:3])}")
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        tokenizer.save(str(temp))
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    return {
        "output": str(output),
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "documents": stats.documents,
        "input_bytes": stats.input_bytes,
        "skipped_lines": stats.skipped_lines,
        "seconds": time.perf_counter() - start,
    }
