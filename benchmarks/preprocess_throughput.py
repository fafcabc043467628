"""Throughput of ``mone-preprocess`` by tokenizer and worker count, on a real corpus.

The corpus is the default one's text (this interpreter's standard-library sources, ~30 MB)
written as one JSONL file, so the numbers include JSON parsing. A byte-level BPE vocabulary is
trained on it first (``mone-tokenizer train``; its time is reported too).

    python benchmarks/preprocess_throughput.py [--workers 1 2] [--vocab-size 8192] [--out DIR]

Prints a table and writes preprocess_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_train import silence_megatron_notices  # noqa: E402

silence_megatron_notices()
from mone_train.data.bpe import train_bpe  # noqa: E402
from mone_train.data.corpus import stdlib_sources  # noqa: E402
from mone_train.data.preprocess import preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "stdlib.jsonl"
        with open(source, "w") as f:
            for path in stdlib_sources()[: args.limit]:
                text = path.read_bytes().decode("utf-8", errors="replace")
                if text:
                    f.write(json.dumps({"text": text}) + "\n")
        start = time.perf_counter()
        tok = tmp / "bpe.json"
        train_bpe([source], tok, args.vocab_size, progress=False)
        bpe_seconds = time.perf_counter() - start
        for kind, path in [("byte", None), ("hf", str(tok))]:
            for workers in args.workers:
                prefix = tmp / f"{kind}-w{workers}"
                s = preprocess(
                    [str(source)],
                    str(prefix),
                    tokenizer_type=kind,
                    tokenizer_path=path,
                    workers=workers,
                    progress=False,
                )
                rows.append(
                    {
                        "tokenizer": kind if kind == "byte" else f"bpe-{args.vocab_size}",
                        "workers": workers,
                        "documents": s["documents"],
                        "tokens": s["tokens"],
                        "input_mib": s["input_bytes"] / 2**20,
                        "seconds": s["seconds"],
                        "docs_per_s": s["documents"] / s["seconds"],
                        "tokens_per_s": s["tokens"] / s["seconds"],
                        "mib_per_s": s["input_bytes"] / 2**20 / s["seconds"],
                    }
                )

    print(f"BPE training ({args.vocab_size}): {bpe_seconds:.1f} s")
    print(
        f"{'tokenizer':<12} {'workers':>7} {'docs':>6} {'tokens':>12} {'s':>6} "
        f"{'docs/s':>8} {'tokens/s':>12} {'MiB/s':>6}"
    )
    for r in rows:
        print(
            f"{r['tokenizer']:<12} {r['workers']:>7} {r['documents']:>6} {r['tokens']:>12,} "
            f"{r['seconds']:>6.1f} {r['docs_per_s']:>8,.0f} {r['tokens_per_s']:>12,.0f} "
            f"{r['mib_per_s']:>6.1f}"
        )
    machine = machine_info()
    result = {"machine": machine, "bpe_train_seconds": bpe_seconds, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if machine.get("gpu") else "cpu"
    (out / f"preprocess_throughput_{device}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
