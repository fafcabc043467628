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

    python benchmarks/memory_plan_check.py [--models tiny small] [--seqs 128 512]

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


def _overrides(model: str, seq: int, recompute: str) -> list[str]:
    return [f"model={model}", f"trainer.seq_length={seq}", f"trainer.recompute={recompute}"]


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


def _rss_growth(model, inputs) -> int:
    """Peak RSS during a first forward + backward minus the RSS before it (sampled at 1 ms)."""
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
    _forward_backward(model, inputs)
    done.set()
    thread.join()
    return max(peak[0], process.memory_info().rss) - before


def _allocator_peak(model, inputs) -> int:
    """Peak of the CPU allocator's live bytes during a forward + backward (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    _forward_backward(model, inputs)  # warm-up: lazily created state is not activation memory
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward_backward(model, inputs)
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
    from mone_train.distributed import init_distributed
    from mone_train.model.builder import build_model
    from mone_train.preflight import compose_config

    init_distributed(1)
    cfg = compose_config(overrides)
    model, _ = build_model(cfg, VOCAB)
    model.train()
    inputs = _step_inputs(cfg)
    measure = _allocator_peak if how == "allocator" else _rss_growth
    print(json.dumps({how: measure(model, inputs)}))


def _run_child(overrides: list[str], how: str) -> int:
    cmd = [sys.executable, __file__, "--child", how, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])[how]


def run_case(model: str, seq: int, recompute: str) -> dict:
    """Estimate and both measurements of one (model, sequence length, recompute) case."""
    from mone_train.plan import activation_bytes, shape_of
    from mone_train.preflight import compose_config

    overrides = _overrides(model, seq, recompute)
    cfg = compose_config(overrides)
    estimate = activation_bytes(shape_of(cfg, VOCAB, device="cpu"), recompute)
    measured = _run_child(overrides, "allocator")
    rss = _run_child(overrides, "rss")
    return {
        "model": model,
        "seq_length": seq,
        "micro_batch_size": cfg.trainer.micro_batch_size,
        "recompute": recompute,
        "estimate_kept_bytes": estimate.kept,
        "estimate_peak_bytes": estimate.peak,
        "measured_peak_bytes": measured,
        "rss_growth_bytes": rss,
        "error": estimate.peak / measured - 1,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every case, print the table, write the JSON."""
    from machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--recompute", nargs="+", default=["none", "moe", "full"])
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_plan_check_cpu.json")
    args = parser.parse_args(argv)
    cases = [
        run_case(model, seq, rc)
        for model in args.models
        for seq in args.seqs
        for rc in args.recompute
    ]
    print(format_table(cases))
    result = {
        "machine": machine_info(),
        "method": "allocator peak: torch.profiler memory events of one forward+backward after a "
        "warm-up step, fresh process per case; rss: psutil RSS sampled at 1 ms during a first "
        "step, minus RSS before (reference only)",
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
        "| model | seq | micro batch | recompute | estimate MiB | measured peak MiB | error "
        "| RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['model']} | {c['seq_length']} | {c['micro_batch_size']} | {c['recompute']} "
            f"| {c['estimate_peak_bytes'] / 2**20:.1f} | {c['measured_peak_bytes'] / 2**20:.1f} "
            f"| {c['error']:+.1%} | {c['rss_growth_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[3:], sys.argv[2])
    else:
        main()
