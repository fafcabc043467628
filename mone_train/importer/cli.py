"""``mone-import``: a local Hugging Face model directory -> a checkpoint mone-train starts from.

    mone-import HF_DIR --out DIR [--overwrite] [--dtype auto|float32|bfloat16|float16]
    mone-import DENSE_HF_DIR --out DIR --upcycle-experts E --upcycle-topk k [--granularity g]

MoE models (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) import as they are; dense ones
(Llama, Qwen2, Qwen3) only upcycled into E experts (``mone_train/importer/upcycle.py``: the upcycled model's
output at step 0 equals the dense model's). The result trains with

    mone-train --config-dir DIR arch=imported [moe.neuron_keep_ratio=0.5 ...]

(MoNE at rho = 0.5 by default: "MoNE-fying" the imported MoE; ``moe=moe`` continues it as plain
MoE). The weights keep the checkpoint's dtype (``--dtype`` to change it) and are held once:
read tensor by tensor, converted, and saved without a model built around them
(``writer.py``). Nothing is downloaded. Bad input (no config.json or weights, a missing or
truncated shard, an index naming the wrong shard, an unknown architecture, a tokenizer that
does not fit the vocabulary, an existing --out, too little free disk for --out) ends in one
line ``mone-import: ...`` and exit code 2, with nothing written. See docs/import.md.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch

from mone_train.command_line import CommandParser, quiet_libraries
from mone_train.errors import report_failure

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="mone-import",
        examples=(
            "mone-import ~/models/OLMoE-1B-7B-0924 --out runs/olmoe-import",
            "mone-train --config-dir runs/olmoe-import arch=imported moe.neuron_keep_ratio=0.5",
            "mone-import ~/models/Llama-3.2-1B --out runs/llama-moe --upcycle-experts 16 "
            "--upcycle-topk 4 --granularity 4",
        ),
        description="Import a local Hugging Face model (docs/import.md) as a checkpoint that "
        "`mone-train --config-dir DIR arch=imported` starts from.",
    )
    parser.add_argument("source", help="a local Hugging Face model folder (config.json, "
                        "safetensors, tokenizer)")  # fmt: skip
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier import")
    parser.add_argument("--upcycle-experts", type=int, metavar="E",
                        help="dense models: make E experts of each MLP")  # fmt: skip
    parser.add_argument("--upcycle-topk", type=int, metavar="K", help="experts per token")
    parser.add_argument("--granularity", type=int, default=1, metavar="G",
                        help="cut each MLP into G parts first (fine-grained experts)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="upcycling: router rows' seed")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", *DTYPES),
        help="dtype of the imported weights (auto: the checkpoint's own, e.g. bf16 stays bf16)",
    )  # fmt: skip
    return parser


def run_import(args) -> tuple[Path, dict]:
    from mone_train.importer.hf_source import ImportError_, read_hf_dir
    from mone_train.importer.mapping import (
        check_supported,
        dense_settings,
        megatron_state,
        model_settings,
    )
    from mone_train.importer.upcycle import upcycled_state
    from mone_train.importer.writer import check_output, write_import

    out = Path(args.out).expanduser().absolute()
    upcycling = args.upcycle_experts is not None
    if upcycling != (args.upcycle_topk is not None):
        raise ImportError_("--upcycle-experts and --upcycle-topk go together")
    check_output(out, args.overwrite)
    source = read_hf_dir(Path(args.source))
    family = check_supported(source, upcycling)
    source.files  # noqa: B018 (the weights are there, every shard whole: before any work)
    source.dtype = DTYPES.get(args.dtype) or source.stored_dtype
    start = time.perf_counter()
    if upcycling:
        settings = dense_settings(source, family, args.upcycle_experts, args.upcycle_topk,
                                  args.granularity)  # fmt: skip
        convert = partial(upcycled_state, source, settings, args.granularity, args.seed)
    else:
        settings = model_settings(source, family)
        convert = partial(megatron_state, source, settings)
    provenance = {
        "source": str(source.path.absolute()), "model_type": source.model_type,
        "family": family, "dtype": str(source.dtype).removeprefix("torch."),
        "upcycled": {"experts": args.upcycle_experts, "topk": args.upcycle_topk,
                     "granularity": args.granularity, "seed": args.seed} if upcycling else None,
    }  # fmt: skip
    write_import(source, convert, settings, out, provenance)
    provenance["seconds"] = round(time.perf_counter() - start, 1)
    return out, provenance


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        out, provenance = run_import(args)
    except Exception as err:
        return report_failure("mone-import", err)
    what = "upcycled" if provenance["upcycled"] else "imported"
    print(f"{what} {provenance['source']} ({provenance['model_type']}, "
          f"{provenance['parameters'] / 1e6:,.1f}M parameters) as family {provenance['family']}")  # fmt: skip
    print(f"train it: mone-train --config-dir {out} arch=imported")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
