"""``mone-preprocess`` and ``mone-tokenizer``: text files into an indexed dataset, and a BPE
tokenizer trained offline (docs/data.md). Bad input ends in one line and exit code 2."""

from __future__ import annotations

import json
import sys

from mone_train import silence_megatron_notices
from mone_train.command_line import CommandParser
from mone_train.data.bpe import train_bpe
from mone_train.data.preprocess import (
    PreprocessError,
    find_inputs,
    format_summary,
    preprocess,
)
from mone_train.data.tokenizer import KINDS, build_tokenizer
from mone_train.errors import ConfigError, report_failure


def build_preprocess_parser() -> CommandParser:
    """The ``mone-preprocess`` command line."""
    parser = CommandParser(
        prog="mone-preprocess",
        examples=(
            "mone-preprocess --input corpus/ --output-prefix data/web --tokenizer-type hf "
            "--tokenizer tok.json",
            "mone-preprocess --input dump.jsonl.gz --json-key content --output-prefix data/code "
            "--workers 2",
        ),
        description="Tokenize .txt / .jsonl / .jsonl.gz files into a megatron-core indexed dataset.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.json")
    parser.add_argument("--tokenizer-type", choices=KINDS, default="byte")
    parser.add_argument("--tokenizer", help="tokenizer file (hf: tokenizer.json; sentencepiece)")
    parser.add_argument("--eod-token", help="hf: end-of-document token if not a usual name")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines")
    parser.add_argument("--no-eod", action="store_true", help="do not append end-of-document")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def preprocess_main(argv: list[str] | None = None) -> int:
    """``mone-preprocess``: files -> a megatron-core indexed dataset; returns the exit code."""
    silence_megatron_notices()
    try:
        args = build_preprocess_parser().parse_args(argv)
        summary = preprocess(
            args.input,
            args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_path=args.tokenizer,
            eod_token=args.eod_token,
            json_key=args.json_key,
            workers=args.workers,
            skip_bad_lines=args.skip_bad_lines,
            append_eod=not args.no_eod,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except ConfigError as err:
        return report_failure("mone-preprocess", err)
    except KeyboardInterrupt:
        print("mone-preprocess: interrupted; nothing written", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def build_tokenizer_parser() -> CommandParser:
    """The ``mone-tokenizer`` command line."""
    parser = CommandParser(
        prog="mone-tokenizer",
        description="Train a byte-level BPE tokenizer offline, and inspect tokenizer files.",
        examples=(
            "mone-tokenizer train --stdlib --vocab-size 4096 --output stdlib-bpe.json",
            "mone-tokenizer train --input corpus/ dump.jsonl.gz --vocab-size 32000 --output tok.json",
            "mone-tokenizer info --type hf tok.json",
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
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


def tokenizer_main(argv: list[str] | None = None) -> int:
    """``mone-tokenizer``: train a BPE tokenizer or describe one; returns the exit code."""
    silence_megatron_notices()
    try:
        args = build_tokenizer_parser().parse_args(argv)
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
    except ConfigError as err:
        return report_failure("mone-tokenizer", err)
    print(
        f"wrote {summary['output']}: vocabulary {summary['vocab_size']:,} from "
        f"{summary['documents']:,} documents ({summary['input_bytes'] / 2**20:,.1f} MiB) in "
        f"{summary['seconds']:.1f} s"
    )
    return 0
