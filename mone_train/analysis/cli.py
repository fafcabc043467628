"""``mone-analyze``: the sparsification study and the neuron-activation study.

    mone-analyze sparsify    --model PATH (--data PREFIX | --text FILE) [--p 0,0.5,0.9] ...
    mone-analyze activations --model PATH (--data PREFIX | --text FILE) [--layers 0,1] ...

Bad input (a path that is not a model, a fraction outside [0, 1), an existing result file, ...)
ends in one line ``mone-analyze: ...`` on stderr and exit code 2, before anything is written.
See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from mone_train.analysis.errors import AnalysisError
from mone_train.command_line import CommandParser, quiet_libraries
from mone_train.errors import report_failure


def _floats(option: str, text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise AnalysisError(f"{option} {text!r} is invalid: expected comma-separated numbers")
    return values


def _ints(option: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise AnalysisError(f"{option} {text!r} is invalid: expected comma-separated integers")
    return values


def parse_fractions(text: str) -> list[float]:
    """Pruning fractions p in [0, 1), in the order given, without repeats."""
    values = _floats("--p", text)
    for p in values:
        if not 0.0 <= p < 1.0:
            raise AnalysisError(
                f"--p {p:g} is invalid: expected pruning fractions in [0, 1) (p = 0 keeps every "
                "neuron; at least one neuron per expert is always kept)"
            )
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    common = CommandParser(add_help=False)
    common.add_argument(
        "--model",
        required=True,
        help="local Hugging Face model directory, mone-train run directory or checkpoint folder",
    )
    source = common.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="megatron-core indexed dataset prefix (PREFIX.bin/.idx)")
    source.add_argument("--text", help="UTF-8 text file, tokenized by the model's own tokenizer")
    common.add_argument(
        "--seq-length", type=int, help="tokens per sequence (default: the model's training length)"
    )
    common.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    common.add_argument(
        "--max-tokens", type=int, default=65536, help="predicted tokens to read at most"
    )
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    common.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="Hugging Face models: auto = bfloat16 on CUDA, float32 on CPU",
    )
    common.add_argument("--out", default="analysis", help="folder for the JSON and PNG results")
    common.add_argument("--overwrite", action="store_true", help="replace existing result files")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = CommandParser(
        prog="mone-analyze",
        examples=(
            "mone-analyze sparsify --model runs/my-moe --data data/web",
            "mone-analyze sparsify --model ~/models/OLMoE-1B-7B-0924 --text held_out.txt --p 0,0.5,0.9",
            "mone-analyze activations --model runs/my-mone --data data/web --out analysis/act",
        ),
        description="Sparsification and neuron-activation studies of MoE models "
        "(docs/analysis.md). Nothing is downloaded: --model must be a local directory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    sp = sub.add_parser(
        "sparsify", parents=[common], help="held-out loss with activated experts' neurons pruned"
    )
    sp.add_argument(
        "--p",
        default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95",
        help="comma-separated pruning fractions in [0, 1)",
    )
    ap = sub.add_parser(
        "activations", parents=[common], help="neuron activation magnitudes inside experts"
    )
    ap.add_argument("--layers", help="MoE decoder layers, 0-based (default: all)")
    ap.add_argument("--experts", help="expert indices (default: all)")
    ap.add_argument("--heatmap-expert", help="LAYER:EXPERT for the heatmap (default: first chosen)")
    ap.add_argument("--heatmap-tokens", type=int, default=64, help="rows of the heatmap")
    ap.add_argument("--thresholds", default="0.01,0.1", help="comma-separated magnitudes")
    return parser


def _check_numbers(args) -> None:
    for option, value in [
        ("--batch-size", args.batch_size),
        ("--max-tokens", args.max_tokens),
        ("--seq-length", args.seq_length),
        ("--heatmap-tokens", getattr(args, "heatmap_tokens", None)),
    ]:
        if value is not None and value < 1:
            raise AnalysisError(f"{option} {value} is invalid: expected an integer >= 1")


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda is invalid here: no CUDA device (use auto or cpu)")
    if choice == "auto":  # CUDA when present, unless MONE_TRAIN_DEVICE says otherwise
        from mone_train.parallel.process_groups import run_device

        choice = run_device()
    return torch.device(choice)


def _source(args, tokenize):
    """The data option's token source; ``tokenize`` is called only once reading starts."""
    from mone_train.analysis.data import indexed_source, text_source

    if args.data:
        return indexed_source(args.data)
    return text_source(args.text, lambda text: tokenize()(text))


def _batches(args, source, model):
    from mone_train.analysis.data import Batches

    seq_length = args.seq_length or model.default_seq_length
    limit = model.max_seq_length
    if limit is not None and seq_length > limit:
        raise AnalysisError(
            f"--seq-length {seq_length} is invalid: expected at most the model's maximum "
            f"position {limit}"
        )
    batches = Batches(source, seq_length, args.batch_size, args.max_tokens, model.vocab_size)
    return batches, {
        **source.describe(),
        "seq_length": seq_length,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
    }


def _activation_choices(args, model):
    """(layers, experts or None, (heatmap layer, expert)) checked against the model."""
    moe_layers = model.moe_layers
    layers = _ints("--layers", args.layers) if args.layers else sorted(moe_layers)
    for layer in layers:
        if layer not in moe_layers:
            raise AnalysisError(
                f"--layers {layer} is invalid: expected MoE decoder layers of this model "
                f"({', '.join(map(str, sorted(moe_layers)))})"
            )
    num_experts = min(moe_layers[layer] for layer in layers)
    experts = _ints("--experts", args.experts) if args.experts else None
    for expert in experts or []:
        if not 0 <= expert < num_experts:
            raise AnalysisError(
                f"--experts {expert} is invalid: expected expert indices in [0, {num_experts})"
            )
    if args.heatmap_expert:
        try:
            layer_text, expert_text = args.heatmap_expert.split(":")
            heatmap = (int(layer_text), int(expert_text))
        except ValueError:
            raise AnalysisError(
                f"--heatmap-expert {args.heatmap_expert!r} is invalid: expected LAYER:EXPERT"
            ) from None
        if (
            heatmap[0] not in layers
            or (experts is not None and heatmap[1] not in experts)
            or not (0 <= heatmap[1] < num_experts)
        ):
            raise AnalysisError(
                f"--heatmap-expert {args.heatmap_expert} is invalid: expected a layer and expert "
                "among those studied (--layers, --experts)"
            )
    else:
        heatmap = (layers[0], (experts or [0])[0])
    thresholds = _floats("--thresholds", args.thresholds)
    if any(t <= 0 for t in thresholds):
        raise AnalysisError(f"--thresholds {args.thresholds} is invalid: expected numbers > 0")
    return layers, experts, heatmap, sorted(set(thresholds))


def run(args) -> dict:
    """Run the study ``args`` ask for; return its result record (also written to --out)."""
    from pathlib import Path

    from mone_train.analysis.models import model_kind, open_model

    _check_numbers(args)
    if args.command == "sparsify":
        from mone_train.analysis import sparsify as study

        fractions = parse_fractions(args.p)
    else:
        from mone_train.analysis import activations as study
    paths = _plan(args, study.FILES)
    model_kind(Path(args.model).expanduser())  # a path that is no model fails before anything
    device = _device(args.device)
    opened = []
    source = _source(args, lambda: opened[0].tokenize)  # data paths are checked before loading
    model = open_model(args.model, device, args.dtype)
    opened.append(model)
    try:
        batches, data = _batches(args, source, model)
        progress = not args.no_progress
        if args.command == "sparsify":
            result = study.run_sparsify(model, batches, fractions, progress)
            result = {**result, "data": data, "device": device.type}
            print(study.format_table(result))
            study.write_sparsify(result, paths)
        else:
            layers, experts, heatmap, thresholds = _activation_choices(args, model)
            stats = study.ActivationStats(layers, experts, thresholds, heatmap, args.heatmap_tokens)
            result = study.run_activations(model, batches, stats, progress)
            result = {**result, "data": data, "device": device.type}
            print(study.format_summary(result))
            study.write_activations(result, stats.heatmap_matrix(), paths)
    finally:
        model.close()
    for path in paths.values():
        print(f"wrote {path}")
    return result


def _plan(args, names):
    from mone_train.analysis.outputs import plan_outputs

    return plan_outputs(args.out, list(names), args.overwrite)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    quiet_libraries()  # and never reach the network: models and tokenizers are on disk
    try:
        args = build_parser().parse_args(argv)
        if args.device == "cpu":
            # Hide GPUs before torch initialises CUDA, so that megatron-core picks the CPU too.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        run(args)
    except Exception as err:
        return report_failure("mone-analyze", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
