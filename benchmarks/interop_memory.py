"""Peak memory of mone-import and mone-export against the checkpoint's size.

Random Qwen3-MoE models are built locally from transformers' config class (nothing is
downloaded) at the sizes asked for (bf16 bytes, default about 0.5 and 1 GB: the same layer
shape, more layers), saved with ``save_pretrained`` in bf16 in 400 MB shards as released
models are. Each is then imported (``mone-import``, a fresh process) and the import exported
again in bf16 (``mone-export --dtype bfloat16``); a tiny model's import and export first give
the floor (Python, torch, megatron-core and transformers loaded, no weights to speak of).
Every command's process tree (the command and the writers megatron's checkpoint save forks) is
sampled every 20 ms. The table reports the peak of the tree's memory: the command's resident
set (RSS) plus the pages private to each process it forked (USS; a forked writer's
copy-on-write view of its parent's tensors is the parent's, not counted twice), beside the
peak of the summed RSS (which does count those pages twice), the largest single process's
RSS, the checkpoint's bytes and the bound

    peak <= 1.5 x checkpoint bytes + 1.5 GiB,  and  (peak_2 - peak_1) <= 1.5 x (bytes_2 - bytes_1)

Prints a table and writes JSON (with the machine) to benchmarks/results/.

    python benchmarks/interop_memory.py [--sizes 0.5 1.0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
SLOPE, FLOOR = 1.5, 1.5 * GIB  # the bound: 1.5 x the checkpoint + 1.5 GiB
SAMPLE_S = 0.02


def qwen3_config(hidden: int, vocab: int, layers: int):
    """The benchmark's Qwen3-MoE shape: 32 experts of hidden/2 neurons, top-4, 4 KV groups."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
        head_dim=64, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_experts=32, num_experts_per_tok=4, max_position_embeddings=4096,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, eos_token_id=1, pad_token_id=None,
    )  # fmt: skip


def layers_for(target_bytes: float, hidden: int, vocab: int) -> int:
    """Decoder layers that bring the bf16 model closest to ``target_bytes``."""
    outer = 2 * vocab * hidden * 2  # embedding and output layer, bf16
    layer = (qwen3_params(hidden, vocab, 2) - qwen3_params(hidden, vocab, 1)) * 2
    return max(1, round((target_bytes - outer) / layer))


def qwen3_params(hidden: int, vocab: int, layers: int) -> int:
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(qwen3_config(hidden, vocab, layers))
    return sum(p.numel() for p in model.parameters())


def save_random_model(folder: Path, hidden: int, vocab: int, layers: int) -> int:
    """A random bf16 model in ``folder`` (400 MB shards); returns its safetensors bytes."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        qwen3_config(hidden, vocab, layers), dtype=torch.bfloat16
    )
    model.save_pretrained(folder, max_shard_size="400MB")
    del model
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS of ``proc`` + USS of its descendants, summed RSS, largest RSS)."""
    tree = rss = largest = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info() if p is not proc else p.memory_info()
        except psutil.Error:
            continue
        tree += info.rss if p is proc else info.uss
        rss, largest = rss + info.rss, max(largest, info.rss)
    return tree, rss, largest


def peak_rss(command: list[str]) -> dict:
    """Run ``command``; its wall time and the peaks of its process tree's memory."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak = [0, 0, 0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                now = _tree_memory(watched)
            except psutil.Error:
                break
            peak[:] = [max(a, b) for a, b in zip(peak, now)]
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}): {err[-2000:]}")
    return {"peak_bytes": peak[0], "peak_rss_sum_bytes": peak[1],
            "peak_rss_largest_bytes": peak[2], "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def _cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def measure(root: Path, name: str, hidden: int, vocab: int, layers: int) -> dict:
    """Build, import and export one model; peaks against its bytes."""
    source = root / f"{name}-hf"
    checkpoint_bytes = save_random_model(source, hidden, vocab, layers)
    imported = root / f"{name}-imported"
    result = {"layers": layers, "hidden": hidden, "vocab": vocab,
              "checkpoint_bytes": checkpoint_bytes}  # fmt: skip
    result["import"] = peak_rss(
        _cli("mone_train.importer.cli", str(source), "--out", str(imported))
    )
    result["export"] = peak_rss(
        _cli(
            "mone_train.export.cli",
            str(imported),
            "--out",
            str(root / f"{name}-exported"),
            "--dtype",
            "bfloat16",
        )  # fmt: skip
    )
    for folder in (source, imported, root / f"{name}-exported"):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    return result


def bound(checkpoint_bytes: int) -> int:
    return int(SLOPE * checkpoint_bytes + FLOOR)


def report(results: dict) -> list[str]:
    """The table's lines; records whether each bound holds (on the tree's peak)."""
    lines = [f"{'model':<6} {'GiB':>6} {'command':<7} {'peak':>9} {'x bytes':>8} "
             f"{'RSS sum':>8} {'RSS max':>8} {'bound':>6} {'ok':>3} {'seconds':>8}"]  # fmt: skip
    for name, r in {"floor": results["floor"], **results["models"]}.items():
        size = r["checkpoint_bytes"]
        for command in ("import", "export"):
            m = r[command]
            peak = m["peak_bytes"]
            m["within_bound"] = peak <= bound(size)
            lines.append(
                f"{name:<6} {size / GIB:>6.3f} {command:<7} {peak / GIB:>9.2f} "
                f"{peak / size:>8.2f} {m['peak_rss_sum_bytes'] / GIB:>8.2f} "
                f"{m['peak_rss_largest_bytes'] / GIB:>8.2f} {bound(size) / GIB:>6.2f} "
                f"{'yes' if m['within_bound'] else 'NO':>3} {m['seconds']:>8.1f}"
            )
    small, large = results["models"].values()
    added = large["checkpoint_bytes"] - small["checkpoint_bytes"]
    for command in ("import", "export"):
        rise = large[command]["peak_bytes"] - small[command]["peak_bytes"]
        results[f"{command}_slope"] = round(rise / added, 3)
        lines.append(f"{command}: the peak rises {rise / GIB:.2f} GiB for {added / GIB:.2f} GiB "
                     f"more checkpoint: {rise / added:.2f} x (bound {SLOPE} x)")  # fmt: skip
    lines.append("(GiB; peak: the command's RSS + its forked writers' private pages; RSS sum "
                 "counts the pages a forked writer shares with it twice)")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs=2, default=[0.5, 1.0], metavar="GB",
                        help="the two models' bf16 sizes in GB")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="interop-memory-") as tmp:
        root = Path(tmp)
        results["floor"] = measure(root, "floor", 64, 1000, 1)
        for name, gb in zip(("small", "large"), args.sizes):
            layers = layers_for(gb * 1e9, args.hidden, args.vocab)
            results["models"][name] = measure(root, name, args.hidden, args.vocab, layers)
    lines = report(results)
    print("\n".join(lines))
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(f"({results['seconds']:.0f} s in all)")
    machine = machine_info()
    payload = {"machine": machine, "args": {**vars(args), "out": str(args.out)},
               "bound": {"slope": SLOPE, "floor_bytes": FLOOR}, **results}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if machine["gpu"] else "cpu"
    (args.out / f"interop_memory_{device}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
