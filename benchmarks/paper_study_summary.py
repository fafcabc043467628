"""Tables and plots of ``benchmarks/paper_study.sh`` (docs/results.md quotes what this writes).

    python benchmarks/paper_study_summary.py regime OUT SETTING_F SETTING_HALF
    python benchmarks/paper_study_summary.py summary OUT

``regime``: the gap in final validation loss between MoE at F and at F/2, in units of the seed
standard deviation (the larger of the two settings' sample standard deviations), written to
``OUT/regime.json`` and ``OUT/regime.md``. ``summary``: one table per claim from the runs,
``mone-report``'s grouped rows and the ``mone-analyze`` results, written to ``OUT/summary.md``,
``OUT/summary.json`` and the plots ``OUT/claims.png`` and ``OUT/sparsify.png``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info  # noqa: E402


def final_losses(out: Path, setting: str) -> dict[str, float]:
    """{seed folder: final validation loss} of a setting's finished runs."""
    losses = {}
    for run in sorted((out / "runs" / setting).glob("seed*")):
        if not (run / "FINISHED.json").is_file():
            continue
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        losses[run.name] = vals[-1]
    return losses


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def regime(out: Path, full: str, half: str) -> dict:
    a, b = final_losses(out, full), final_losses(out, half)
    (ma, sa), (mb, sb) = mean_std(list(a.values())), mean_std(list(b.values()))
    noise = max(sa, sb)
    gap = mb - ma
    result = {
        "machine": machine_info(),
        "settings": {full: a, half: b},
        "mean": {full: ma, half: mb},
        "std": {full: sa, half: sb},
        "gap": gap,
        "gap_in_std": gap / noise if noise > 0 else float("inf"),
        "capacity_sensitive": gap >= 3 * noise,
    }
    lines = [
        "| setting | seeds | final val loss (mean ± std, nats/byte) |",
        "|---|---|---|",
        f"| {full} | {len(a)} | {ma:.4f} ± {sa:.4f} |",
        f"| {half} | {len(b)} | {mb:.4f} ± {sb:.4f} |",
        "",
        f"gap {gap:+.4f} nats/byte = {result['gap_in_std']:.1f} seed std "
        f"({'capacity-sensitive' if result['capacity_sensitive'] else 'NOT capacity-sensitive'}:"
        " the goal is >= 3)",
    ]
    (out / "regime.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "regime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "regime" and len(argv) == 4:
        regime(Path(argv[1]), argv[2], argv[3])
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        from paper_study_claims import summary

        summary(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
