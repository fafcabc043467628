"""``mone-tokenizer``: train a byte-level BPE tokenizer offline, and inspect tokenizer files.

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

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mone_train import silence_megatron_notices
from mone_train.data.preprocess import (
    PreprocessError,
    Stats,
    decode_record,
    find_inputs,
    read_records,
)
from mone_train.data.tokenizer import KINDS, TokenizerError, build_tokenizer

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mone-tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer (offline)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="files or directories (.txt, .jsonl[.gz])")
    source.add_argument(
        "--stdlib", action="store_true", help="the default corpus's training documents"
    )
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="tokenizer.json to write")
    train.add_argument("--json-key", default="text")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--valid-every", type=int, default=50, help="--stdlib: held-out stride")
    train.add_argument("--skip-bad-lines", action="store_true")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")
    info = sub.add_parser("info", help="print a tokenizer file's vocabulary and special tokens")
    info.add_argument("path")
    info.add_argument("--type", choices=[k for k in KINDS if k != "byte"], default="hf")
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_megatron_notices()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(json.dumps(build_tokenizer(args.type, args.path).describe(), indent=2))
            return 0
        if args.stdlib:
            from mone_train.data.corpus import stdlib_sources

            # The training split only: the held-out documents stay unseen by the vocabulary too.
            every = args.valid_every
            if every < 1:
                raise PreprocessError(f"--valid-every={every}: expected an integer >= 1")
            files = [p for i, p in enumerate(stdlib_sources()) if i % every != every - 1]
        else:
            files = find_inputs(args.input)
        summary = train_bpe(
            files,
            args.output,
            args.vocab_size,
            json_key=args.json_key,
            min_frequency=args.min_frequency,
            skip_bad_lines=args.skip_bad_lines,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (PreprocessError, TokenizerError) as err:
        print(f"mone-tokenizer: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['output']}: vocabulary {summary['vocab_size']:,} from "
        f"{summary['documents']:,} documents ({summary['input_bytes'] / 2**20:,.1f} MiB) in "
        f"{summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
