"""``mone-export``: a run directory or checkpoint -> a Hugging Face model directory.

    mone-export RUN_DIR_OR_CHECKPOINT --out DIR [--overwrite] [--dtype float32|bfloat16|float16]
                [--max-shard-size 5GB] [--with-mtp]

Bad input (a path that is no checkpoint, a checkpoint folder without ``COMPLETE.json``, a run
that saved no checkpoint, a save still being written, an existing ``--out`` without
``--overwrite``, too little free disk for ``--out``) ends in one line ``mone-export: ...`` on
stderr and exit code 2, before anything is written. See docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys

from mone_train.command_line import CommandParser, quiet_libraries
from mone_train.errors import report_failure

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default until v5


def build_parser() -> argparse.ArgumentParser:
    """The ``mone-export`` command line."""
    parser = CommandParser(
        prog="mone-export",
        examples=(
            "mone-export runs/my-run --out exported/my-run",
            "mone-export runs/my-run/checkpoints/step_000600 --out exported/s600 --dtype bfloat16",
        ),
        description="Write a mone-train checkpoint as a Hugging Face model directory "
        "(docs/inference.md). Loads offline with AutoModelForCausalLM.from_pretrained(DIR, "
        "trust_remote_code=True).",
    )
    parser.add_argument("source", help="run directory (its newest checkpoint) or checkpoint folder")
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="dtype of the written weights (training keeps fp32 masters)",
    )  # fmt: skip
    parser.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
        help="largest safetensors file (e.g. 5GB, 500MB; a larger tensor gets a file of its own)",
    )  # fmt: skip
    parser.add_argument(
        "--with-mtp", action="store_true",
        help="also write the multi-token prediction layers (DeepSeek-V3's layout: extra layers "
        "after the decoder's; transformers' model ignores them, speculative decoders read them); "
        "DeepseekV3ForCausalLM exports only, not MoNE ones (K < F)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        from mone_train.export.writer import export_checkpoint

        result = export_checkpoint(
            args.source, args.out, args.overwrite, args.dtype, args.max_shard_size, args.with_mtp
        )
    except Exception as err:
        return report_failure("mone-export", err)
    print(
        f"exported {result.checkpoint} (step {result.step}) as {result.architecture}: "
        f"{result.num_kept_neurons} of {result.num_neurons} neurons kept per routed expert"
    )
    print(result.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
