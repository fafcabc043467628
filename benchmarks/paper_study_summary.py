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
import math
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


# The study's settings in table order: (folder, label, flavour).
SETTINGS = [
    ("moe-F128", "MoE F=128", "moe"),
    ("moe-F64", "MoE F=64", "moe"),
    ("moe-matched", "MoE F=85 (MoNE rho=0.5's activated parameters)", "moe"),
    ("mone-0.25", "MoNE rho=0.25", "mone"),
    ("mone-0.5", "MoNE rho=0.5", "mone"),
    ("mone-0.75", "MoNE rho=0.75", "mone"),
    ("mone-0.5-nolbl", "MoNE rho=0.5, no NG-LBL", "mone"),
]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def setting_stats(out: Path, folder: str) -> dict | None:
    """Seeds' final losses (mean, std), parameter counts and the last NG-LBL / neuron figures."""
    finals = final_losses(out, folder)
    if not finals:
        return None
    mean, std = mean_std(list(finals.values()))
    first = sorted((out / "runs" / folder).glob("seed*"))[0]
    params = json.loads((first / "params.json").read_text())
    health: dict[str, list[float]] = {"ng_lbl": [], "util": [], "never": []}
    for run in sorted((out / "runs" / folder).glob("seed*")):
        logged = [r for r in _records(run) if "loss" in r]
        last = logged[-4:]  # the last 400 steps
        for key, name in [("ng_lbl", "ng_lbl"), ("util", "neurons/utilisation")]:
            values = [r[name] for r in last if r.get(name) is not None]
            if values:
                health[key].append(statistics.fmean(values))
        never = [sum(v for k, v in r.items() if k.endswith("/never_selected")) for r in last]
        if any("never_selected" in k for k in logged[-1]):
            health["never"].append(statistics.fmean(never))
    return {
        "seeds": finals,
        "mean": mean,
        "std": std,
        "n": len(finals),
        "activated": params.get("activated"),
        "activated_moe": params.get("activated_moe"),
        "total": params.get("total"),
        "ng_lbl": statistics.fmean(health["ng_lbl"]) if health["ng_lbl"] else None,
        "neuron_utilisation": statistics.fmean(health["util"]) if health["util"] else None,
        "never_selected": statistics.fmean(health["never"]) if health["never"] else None,
    }


def compare(a: dict, b: dict) -> dict:
    """a - b with its standard error (Welch), and which way it points at 2 standard errors."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if abs(diff) <= 2 * se:
        verdict = "equal within noise"
    else:
        verdict = "lower (better)" if diff < 0 else "higher (worse)"
    return {"diff": diff, "se": se, "t": diff / se if se > 0 else math.inf, "verdict": verdict}


def _load(out: Path, study: str, folder: str) -> dict | None:
    path = out / study / folder / f"{study}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary(out: Path) -> dict:
    stats = {folder: setting_stats(out, folder) for folder, _, _ in SETTINGS}
    label = {folder: text for folder, text, _ in SETTINGS}
    lines = ["## Final validation loss (nats/byte), mean ± std over seeds", "",
             "| setting | seeds | final val loss | activated/token (neuron top-k) | "
             "activated/token (routing) | total | NG-LBL (last 400 steps) | "
             "neuron utilisation | neurons never selected per 100 steps |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for folder, text, _ in SETTINGS:
        st = stats[folder]
        if st is None:
            lines.append(f"| {text} | 0 | (not run) | | | | | | |")
            continue

        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        lines.append(
            f"| {text} | {st['n']} | {st['mean']:.4f} ± {st['std']:.4f} | "
            f"{st['activated'] / 1e3:.1f} k | {st['activated_moe'] / 1e3:.1f} k | "
            f"{st['total'] / 1e3:.1f} k | {fmt(st['ng_lbl'], '.3f')} | "
            f"{fmt(st['neuron_utilisation'], '.3f')} | {fmt(st['never_selected'], '.1f')} |"
        )
    claims = {}
    pairs = [
        ("claim1", "mone-0.5", "moe-F128", "MoNE rho=0.5 vs MoE at the same total parameters"),
        ("claim2", "mone-0.5", "moe-matched", "MoNE rho=0.5 vs MoE at equal activated parameters"),
        # F (1 + 2 rho) / 3 = F/2 at rho = 0.25: the regime's F/2 MoE is rho = 0.25's match
        (
            "claim2_quarter",
            "mone-0.25",
            "moe-F64",
            "MoNE rho=0.25 vs MoE at equal activated parameters (F/2)",
        ),
        ("ng_lbl", "mone-0.5", "mone-0.5-nolbl", "MoNE rho=0.5 with vs without NG-LBL"),
        ("regime", "moe-F64", "moe-F128", "MoE F/2 vs F (the regime check)"),
    ]
    lines += ["", "## Comparisons (difference of means ± its standard error)", "",
              "| comparison | difference (nats/byte) | t | reading at 2 standard errors |",
              "|---|---|---|---|"]  # fmt: skip
    for key, a, b, text in pairs:
        if stats[a] is None or stats[b] is None:
            continue
        c = claims[key] = compare(stats[a], stats[b])
        lines.append(f"| {text} | {c['diff']:+.4f} ± {c['se']:.4f} | {c['t']:+.1f} | "
                     f"first is {c['verdict']} |")  # fmt: skip
    sparsify = {f: _load(out, "sparsify", f) for f, _, _ in SETTINGS}
    activations = {f: _load(out, "activations", f) for f, _, _ in SETTINGS}
    fractions = sorted({r["p"] for d in sparsify.values() if d for r in d["results"]})
    lines += ["", "## Sparsification (claim 3): loss increase with a share p of each activated "
              "expert's neurons pruned by |SiLU(gate)| (first seed)", "",
              "| model | " + " | ".join(f"p={p:g}" for p in fractions) + " |",
              "|---|" + "---|" * len(fractions)]  # fmt: skip
    for folder, text, _ in SETTINGS:
        d = sparsify[folder]
        if d:
            by_p = {r["p"]: r["delta_loss"] for r in d["results"]}
            cells = [f"{by_p[p]:+.3f}" if p in by_p else "" for p in fractions]
            lines.append(f"| {text} | " + " | ".join(cells) + " |")
    lines += ["", "## Train rho vs inference rho (MoNE, first seed): held-out loss", "",
              "| trained at | " + " | ".join(f"run at {1 - p:g}" for p in fractions) + " |",
              "|---|" + "---|" * len(fractions)]  # fmt: skip
    for folder, text, flavour in SETTINGS:
        d = sparsify[folder]
        if d and flavour == "mone":
            by_p = {r["p"]: r["loss"] for r in d["results"]}
            best = min(by_p.values())
            cells = [(f"**{by_p[p]:.4f}**" if by_p[p] == best else f"{by_p[p]:.4f}")
                     if p in by_p else "" for p in fractions]  # fmt: skip
            lines.append(f"| {text} | " + " | ".join(cells) + " |")
    lines += ["", "## Activation concentration (claim 4): |SiLU(gate)| of every activated "
              "expert row (first seed)", "",
              "| model | mean | share < 0.01 | share < 0.1 |", "|---|---|---|---|"]  # fmt: skip
    for folder, text, _ in SETTINGS:
        d = activations[folder]
        if d:
            o = d["overall"]
            lines.append(f"| {text} | {o['mean']:.3f} | {o['fraction_under']['0.01']:.3f} | "
                         f"{o['fraction_under']['0.1']:.3f} |")  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    result = {"machine": machine_info(), "settings": stats, "comparisons": claims,
              "labels": label}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(out, stats, sparsify)
    print("\n".join(lines))
    return result


def _plot(out: Path, stats: dict, sparsify: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    shown = [(f, t, fl) for f, t, fl in SETTINGS if stats[f] is not None]
    for i, (folder, _text, flavour) in enumerate(shown):
        st = stats[folder]
        colour = "tab:red" if flavour == "moe" else "tab:blue"
        ax.errorbar(i, st["mean"], yerr=st["std"], fmt="o", color=colour, capsize=4, ms=7)
        ax.scatter([i] * st["n"], list(st["seeds"].values()), color=colour, alpha=0.3, s=12)
    ax.set_xticks(range(len(shown)), [t.replace(" (", "\n(") for _, t, _ in shown], fontsize=7)
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title("Final validation loss: mean ± std over seeds (dots: each seed)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "claims.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for folder, text, flavour in SETTINGS:
        d = sparsify.get(folder)
        if not d:
            continue
        ps = [r["p"] for r in d["results"]]
        ax.plot(ps, [r["delta_loss"] for r in d["results"]], "--" if flavour == "moe" else "-",
                marker=".", label=text)  # fmt: skip
    ax.set_xlabel("p, share of each activated expert's neurons pruned")
    ax.set_ylabel("loss increase (nats/byte)")
    ax.set_title("Sparsification of trained models (first seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sparsify.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "regime" and len(argv) == 4:
        regime(Path(argv[1]), argv[2], argv[3])
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        summary(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
