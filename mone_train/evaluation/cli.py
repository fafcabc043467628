"""``mone-eval``: a run's in-loop evaluation, offline, on a checkpoint.

The model is rebuilt from the checkpoint's saved config (one process, or data parallel under
torchrun: checkpoints reshard on load) and evaluated exactly as the training loop evaluates it
(:class:`mone_train.components.evaluator.Evaluator`): the run's validation sets on the same
sequences, its tasks (or ``--tasks`` files instead) and keep ratios (or ``--keep-ratios``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mone_train.command_line import CommandParser, quiet_libraries
from mone_train.errors import ConfigError, report_failure

# What the table prints of a task, in this order (those its kind has).
TASK_COLUMNS = ("acc", "acc_norm", "loglikelihood", "perplexity", "word_perplexity",
                "byte_perplexity", "bits_per_byte")  # fmt: skip


def _print_table(result: dict) -> None:
    print(f"{result['checkpoint']} (step {result['step']})")
    rows = [("", result)] + [(f" at rho={r}", part) for r, part in result["keep_ratios"].items()]
    for suffix, part in rows:
        for name, m in part["sets"].items():
            bpb = f", {m['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in m else ""
            print(f"  set  {name}{suffix}: loss {m['loss']:.4f} nats/token{bpb}")
        for name, m in part["tasks"].items():
            shown = ", ".join(f"{key} {m[key]:.4f}" for key in TASK_COLUMNS if key in m)
            print(f"  task {name}{suffix}: {shown} ({m['count']} examples)")


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="mone-eval",
        description=__doc__.split("\n")[0],
        examples=(
            "mone-eval runs/my-run                        # the run's in-loop evaluation",
            "mone-eval runs/my-run --tasks tasks/arc_easy.jsonl --keep-ratios 1 0.5 0.25 --json",
            "torchrun --nproc-per-node 4 -m mone_train.evaluation.cli runs/my-run  # data parallel",
        ),
    )
    parser.add_argument("target", type=Path, metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its newest checkpoint) or a checkpoint")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", metavar="FILE",
                        help="task JSONL files (default: the run's tasks)")  # fmt: skip
    parser.add_argument("--keep-ratios", nargs="+", type=float, metavar="RHO",
                        help="evaluate at these keep ratios too (default: the run's)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        # imported here, after quiet_libraries: megatron-core announces its CPU fallbacks
        from mone_train.evaluation.offline import evaluate_checkpoint

        result = evaluate_checkpoint(args.target, args.tasks, args.keep_ratios)
    except ConfigError as err:
        return report_failure("mone-eval", err)
    if not _is_main():
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "metrics"}))
    else:
        _print_table(result)
    return 0


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
