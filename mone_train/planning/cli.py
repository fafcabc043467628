"""``mone-plan``'s command line: the plan of a run (``mone_train/planning/plan.py``) or, with
``--search``, the layouts that fit ranked by the cost model (``mone_train/planning/layout_search.py``).
Bad input ends in one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mone_train.command_line import CommandParser
from mone_train.config import Config
from mone_train.errors import EXIT_CONFIG_ERROR, ConfigError
from mone_train.hardware import DEFAULT_GPU, GPUS
from mone_train.planning.plan import format_plan, make_plan


def vocab_size_of(cfg: Config) -> int:
    """``model.vocab_size``, else the configured tokenizer's vocabulary."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from mone_train.data.tokenizer import tokenizer_from_config

    return tokenizer_from_config(cfg.data.tokenizer).vocab_size


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, Hydra overrides) from the command line."""
    from mone_train.planning.layout_search import HARDWARE

    parser = CommandParser(
        prog="mone-plan",
        examples=(
            "mone-plan model=3b arch=deepseek trainer=gpu trainer.expert_parallel_size=8 "
            "--world-size 8",
            "mone-plan model=1b trainer=gpu --search --nodes 4 --gpus-per-node 8 --gpu H100",
            "mone-plan --config-dir runs/olmoe-import arch=imported --search --world-size 16",
        ),
        description="Memory, all-to-all traffic and FLOPs of a mone-train run per device, before "
        "it starts. Takes mone-train's Hydra overrides, e.g. "
        "`mone-plan model=1b trainer.expert_parallel_size=8 --world-size 8`.",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        help="devices in the job (default 1; with --search, "
        "nodes x GPUs per node, 8 per node unless --gpus-per-node says otherwise)",
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float, help="memory per device (default: the --gpu's)"
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"one of {', '.join(sorted(GPUS))}")
    search = parser.add_argument_group(
        "layout search", "--search ranks every layout that fits by a cost model's step time"
    )
    search.add_argument("--search", action="store_true", help="find the fastest layout that fits")
    search.add_argument("--nodes", type=int, help="nodes in the job (--search; default 1)")
    search.add_argument("--gpus-per-node", type=int, help="GPUs per node (--search; default 8)")
    search.add_argument("--top", type=int, default=5, help="layouts to print (--search)")
    search.add_argument("--json", action="store_true", help="print the search as JSON")
    search.add_argument("--headroom", type=float, default=0.10,
                        help="share of each GPU's memory kept free (--search)")  # fmt: skip
    for kind, default in (("tp", 0.0), ("all-to-all", 0.0), ("grad-sync", 0.0)):
        search.add_argument(f"--overlap-{kind}", type=float, default=default,
                            help=f"share of the {kind} communication hidden (--search)")  # fmt: skip
    parser.add_argument(
        "--config-dir", help="an extra config folder, as mone-train's (e.g. a mone-import folder)"
    )
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]}; see mone-plan --help")
    if args.config_dir:
        folder = Path(args.config_dir).expanduser().absolute()
        if not folder.is_dir():
            raise ConfigError(f"--config-dir {folder}: no such folder")
        overrides.append(f"hydra.searchpath=[file://{folder}]")
    gpus = sorted(set(GPUS) | (set(HARDWARE) if args.search else set()))
    if args.gpu not in (HARDWARE if args.search else GPUS):
        raise ConfigError(f"--gpu={args.gpu} is invalid: expected one of {', '.join(gpus)}")
    for name in ("nodes", "gpus_per_node", "json"):
        if getattr(args, name) not in (None, False) and not args.search:
            raise ConfigError(f"--{name.replace('_', '-')} needs --search")
    _fill_search_world(args)
    args.world_size = 1 if args.world_size is None else args.world_size
    args.gpu_memory_gib = args.gpu_memory_gib or GPUS[args.gpu].memory_gib
    for name, value, ok in (
        ("--world-size", args.world_size, args.world_size >= 1),
        ("--gpu-memory-gib", args.gpu_memory_gib, args.gpu_memory_gib > 0),
        ("--mfu", args.mfu, 0 < args.mfu <= 1),
        ("--nodes", args.nodes, args.nodes >= 1),
        ("--gpus-per-node", args.gpus_per_node, args.gpus_per_node >= 1),
        ("--top", args.top, args.top >= 1),
        ("--headroom", args.headroom, 0 <= args.headroom < 1),
        *((f"--overlap-{k}", getattr(args, f"overlap_{k.replace('-', '_')}"),
           0 <= getattr(args, f"overlap_{k.replace('-', '_')}") <= 1)
          for k in ("tp", "all-to-all", "grad-sync")),
    ):  # fmt: skip
        if not ok:
            raise ConfigError(
                f"{name}={value} is invalid: expected a positive value (mfu <= 1, headroom and "
                "overlaps in [0, 1])"
            )
    return args, overrides


def _fill_search_world(args: argparse.Namespace) -> None:
    """Nodes and GPUs per node for --search, from themselves or from --world-size."""
    world, per_node = args.world_size, args.gpus_per_node
    if args.search and world is not None and args.nodes is None and world >= 1:
        per_node = per_node or min(world, 8)
        if world % per_node:
            raise ConfigError(
                f"--world-size={world} is not a whole number of nodes of {per_node} GPUs; "
                "give --nodes and --gpus-per-node"
            )
        args.nodes = world // per_node
    args.nodes = args.nodes or 1
    args.gpus_per_node = per_node or 8
    if args.search and world is not None and world != args.nodes * args.gpus_per_node:
        raise ConfigError(
            f"--world-size={world} differs from --nodes x --gpus-per-node = "
            f"{args.nodes} x {args.gpus_per_node}; give one or the other"
        )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: print the plan, or one line and exit code 2 on a bad input."""
    from mone_train.compose import compose_config, describe_error

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        try:
            cfg = compose_config(overrides)
        except Exception as err:  # Hydra / OmegaConf composition errors
            raise ConfigError(describe_error(err)) from None
        vocab = vocab_size_of(cfg)
        if args.search:
            print(run_search(cfg, vocab, args, overrides))
            return
        plan = make_plan(cfg, vocab, args.world_size, args.gpu_memory_gib, args.mfu, args.gpu)
    except ConfigError as err:
        print(f"mone-plan: error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    print(format_plan(plan, vocab))


def run_search(cfg: Config, vocab: int, args: argparse.Namespace, overrides: list[str]) -> str:
    """``--search``: the fitting layouts, fastest first, as text or JSON."""
    import json

    from mone_train.planning.layout_search import (
        HARDWARE,
        Overlap,
        as_json,
        format_search,
        no_fit_message,
        search,
    )

    hw = HARDWARE[args.gpu]
    overlap = Overlap(args.overlap_tp, args.overlap_all_to_all, args.overlap_grad_sync)
    result = search(cfg, vocab, args.nodes, args.gpus_per_node, hw, args.headroom, overlap)
    if not result.candidates:
        raise ConfigError(no_fit_message(result, args.nodes, args.gpus_per_node, hw))
    user = [o for o in overrides if not o.startswith("hydra.")]
    if args.json:
        return json.dumps(as_json(result, args.nodes, args.gpus_per_node, hw, user, args.top),
                          indent=2)  # fmt: skip
    return format_search(result, cfg, args.nodes, args.gpus_per_node, hw, user, args.top)


if __name__ == "__main__":
    main()
