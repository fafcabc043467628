"""mone-plan's activation estimate against the measured peak of one forward + backward on CPU.

Each case runs in a fresh process: the model is built, one warm-up step runs, then one
training forward + backward of a micro batch is measured two ways:

- allocator peak (the figure compared): torch's profiler with ``profile_memory=True`` records
  every allocation and free of the CPU allocator; the peak of their running sum during the
  step is the activation peak, with parameters and gradient buffers (allocated before) excluded.
  It counts tensor bytes as ``torch.cuda.max_memory_allocated`` does on a GPU, not the
  allocator's caching or fragmentation.
- RSS growth (for reference only): the process's resident set, sampled every millisecond by a
  thread during a *first* forward + backward in another fresh process, minus the RSS before.
  It includes the C allocator's arenas, lazily created state and thread buffers, so it is
  above the tensor peak, and noisy.

Tensor and pipeline parallel layouts (``--layouts tp2 pp2``) run on 2 gloo processes under
torchrun; each rank measures its own allocator peak the same way, over one micro batch (TP 2:
a rank holds half of every sequence between blocks and half of the heads) or over a whole
1F1B step of 4 micro batches (PP 2: the first stage holds 2 micro batches in flight), and is
compared with the planner's estimate for its stage.

    python benchmarks/memory_plan_check.py [--models tiny small] [--seqs 128 512]
        [--layouts 1 tp2 pp2]

Prints a table and writes results/memory_plan_check_cpu.json (target: estimate within 25 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 258  # the byte tokenizer's vocabulary (the default corpus)
TARGET = 0.25


LAYOUTS = {  # name: (processes, trainer overrides)
    "1": (1, []),
    "tp2": (2, ["trainer.tensor_parallel_size=2"]),
    "pp2": (2, ["trainer.pipeline_parallel_size=2", "trainer.micro_batch_size=4",
                "trainer.global_batch_size=16"]),  # 4 micro batches: 2 in flight on stage 0
}  # fmt: skip


def _overrides(model: str, seq: int, recompute: str, layout: str = "1") -> list[str]:
    return [f"model={model}", f"trainer.seq_length={seq}", f"trainer.recompute={recompute}",
            *LAYOUTS[layout][1]]  # fmt: skip


def _step_inputs(cfg):
    import torch

    from mone_train.model.lm import causal_mask

    t = cfg.trainer
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (t.micro_batch_size, t.seq_length + 1), generator=gen)
    positions = torch.arange(t.seq_length).expand(t.micro_batch_size, -1)
    return tokens[:, :-1], positions, causal_mask(t.seq_length, torch.device("cpu")), tokens[:, 1:]


def _forward_backward(model, inputs) -> None:
    tokens, positions, mask, labels = inputs
    model.zero_grad_buffer()
    model(tokens, positions, mask, labels=labels).mean().backward()


def _rss_growth(step) -> int:
    """Peak RSS during a first ``step()`` minus the RSS before it (sampled at 1 ms)."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    step()
    done.set()
    thread.join()
    return max(peak[0], process.memory_info().rss) - before


def _allocator_peak(step) -> int:
    """Peak of the CPU allocator's live bytes during ``step()`` (a forward + backward), after a
    warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: lazily created state is not activation memory
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def child(overrides: list[str], how: str) -> None:
    """Measure one case in this process; print the bytes as JSON."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from mone_train import silence_megatron_notices

    silence_megatron_notices()
    from mone_train.compose import compose_config
    from mone_train.model.builder import build_model
    from mone_train.parallel.process_groups import init_distributed

    init_distributed(1)
    cfg = compose_config(overrides)
    model, _ = build_model(cfg, VOCAB)
    model.train()
    inputs = _step_inputs(cfg)
    measure = _allocator_peak if how == "allocator" else _rss_growth
    print(json.dumps({how: measure(lambda: _forward_backward(model, inputs))}))


def rank_child(out_dir: str, overrides: list[str]) -> None:
    """One rank of a tensor- or pipeline-parallel case (under torchrun): its allocator peak
    over a micro batch (one stage) or a whole pipeline step, into ``out_dir/rank<r>.json``."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from mone_train import silence_megatron_notices

    silence_megatron_notices()
    from mone_train.compose import compose_config
    from mone_train.config import model_vocab_size
    from mone_train.model.builder import build_model
    from mone_train.parallel.pipeline import Pipeline
    from mone_train.parallel.process_groups import init_distributed

    cfg = compose_config(overrides)
    t = cfg.trainer
    info = init_distributed(t.expert_parallel_size, None, 600, 600, t.tensor_parallel_size,
                            t.pipeline_parallel_size)  # fmt: skip
    vocab = model_vocab_size(cfg, VOCAB)
    model, _ = build_model(cfg, vocab, info.ep_rank, info.ep_size)
    model.train()
    tokens, positions, mask, labels = _step_inputs(cfg)
    if info.pp_size == 1:
        measured = _allocator_peak(lambda: _forward_backward(model, (tokens, positions, mask,
                                                                      labels)))  # fmt: skip
    else:  # one 1F1B step of all the micro batches
        import torch

        batch = {"tokens": tokens, "labels": labels, "position_ids": positions,
                 "loss_mask": torch.ones_like(tokens, dtype=torch.float)}  # fmt: skip
        micro = t.global_batch_size // (t.micro_batch_size * info.dp_size)
        pipeline = Pipeline(model, mask, info, t.seq_length, t.micro_batch_size)

        def step():
            model.zero_grad_buffer()
            pipeline.run(iter([batch] * micro), micro, forward_only=False)

        measured = _allocator_peak(step)
    record = {"rank": info.rank, "tp_rank": info.tp_rank, "pp_rank": info.pp_rank,
              "allocator": measured}  # fmt: skip
    (Path(out_dir) / f"rank{info.rank}.json").write_text(json.dumps(record))


def _run_child(overrides: list[str], how: str) -> int:
    cmd = [sys.executable, __file__, "--child", how, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])[how]


def _run_ranks(overrides: list[str], nproc: int) -> list[dict]:
    """Each rank's measurement of a case, from a torchrun job of ``nproc`` processes."""
    import tempfile

    torchrun = Path(sys.executable).parent / "torchrun"
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(nproc), __file__,
               "--rank-child", out_dir, *overrides]  # fmt: skip
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        return [json.loads(f.read_text()) for f in sorted(Path(out_dir).glob("rank*.json"))]


def run_case(model: str, seq: int, recompute: str, layout: str = "1") -> list[dict]:
    """Estimate and measurement of one (model, sequence length, recompute, layout) case: one
    row, or one per pipeline stage (the fullest rank of the stage)."""
    from mone_train.compose import compose_config
    from mone_train.planning.plan import activation_bytes, make_plan, shape_of

    overrides = _overrides(model, seq, recompute, layout)
    cfg = compose_config(overrides)
    row = {"model": model, "layout": layout, "seq_length": seq,
           "micro_batch_size": cfg.trainer.micro_batch_size, "recompute": recompute}  # fmt: skip
    nproc = LAYOUTS[layout][0]
    if nproc == 1:
        estimate = activation_bytes(shape_of(cfg, VOCAB, device="cpu"), recompute)
        measured = _run_child(overrides, "allocator")
        return [{**row, "stage": 0, "estimate_kept_bytes": estimate.kept,
                 "estimate_peak_bytes": estimate.peak, "measured_peak_bytes": measured,
                 "rss_growth_bytes": _run_child(overrides, "rss"),
                 "error": estimate.peak / measured - 1}]  # fmt: skip
    plan = make_plan(cfg, VOCAB, nproc, device="cpu")
    ranks = _run_ranks(overrides, nproc)
    rows = []
    for stage in plan.stages:
        estimate = stage.activations[recompute]
        measured = max(r["allocator"] for r in ranks if r["pp_rank"] == stage.layers.index)
        rows.append({**row, "stage": stage.layers.index, "in_flight": stage.in_flight,
                     "estimate_kept_bytes": estimate.kept, "estimate_peak_bytes": estimate.peak,
                     "measured_peak_bytes": measured, "rss_growth_bytes": None,
                     "error": estimate.peak / measured - 1})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run every case, print the table, write the JSON."""
    from machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--recompute", nargs="+", default=["none", "moe", "full"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_plan_check_cpu.json")
    args = parser.parse_args(argv)
    cases = [
        row
        for layout in args.layouts
        for model in args.models
        for seq in args.seqs
        for rc in args.recompute
        for row in run_case(model, seq, rc, layout)
    ]
    print(format_table(cases))
    result = {
        "machine": machine_info(),
        "method": "allocator peak: torch.profiler memory events of one forward+backward after a "
        "warm-up step, fresh process per case (tp2 / pp2: each of 2 gloo ranks under torchrun, "
        "pp2 over a 1F1B step of 4 micro batches; the fullest rank per stage); rss: psutil RSS "
        "sampled at 1 ms during a first step, minus RSS before (reference only)",
        "target_abs_error": TARGET,
        "within_target": all(abs(c["error"]) <= TARGET for c in cases),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


def format_table(cases: list[dict]) -> str:
    """Markdown table of the cases (MiB)."""
    lines = [
        "| layout | stage | model | seq | micro batch | recompute | estimate MiB "
        "| measured peak MiB | error | RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        rss = c["rss_growth_bytes"]
        lines.append(
            f"| {c['layout']} | {c['stage']} | {c['model']} | {c['seq_length']} "
            f"| {c['micro_batch_size']} | {c['recompute']} "
            f"| {c['estimate_peak_bytes'] / 2**20:.1f} | {c['measured_peak_bytes'] / 2**20:.1f} "
            f"| {c['error']:+.1%} | {'-' if rss is None else f'{rss / 2**20:.1f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[3:], sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--rank-child":
        rank_child(sys.argv[2], sys.argv[3:])
    else:
        main()
