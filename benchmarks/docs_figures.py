"""Every benchmark figure quoted in README.md and docs/ next to the results JSON it came from.

A quoted figure carries a hidden marker right after it, naming the results file (under
benchmarks/results/), the path to the value and how it is printed:

    1.006<!-- from trainer_throughput_cpu-avx512.json: paired_effects > MoNE / MoE step time > ratio | .3f -->

``FILE`` is a path under benchmarks/results/ (``paper_study_cpu_2026-11-30/summary.json``). Path
segments are separated by ``>``: a dict key, a list index, or ``field=value`` to pick the list
element whose ``field`` equals ``value`` (``impl=fused & rows=4096``: all conditions). The spec is
a Python format spec, optionally preceded by ``*K`` or ``/K`` (scale the value first): ``/60 .1f``
prints seconds as minutes. A string value (a machine name, a date) is compared as it is; a
figure's minus sign may be the typographic one (−).

A table too large to mark cell by cell is rendered from its JSON by a function in ``TABLES``
and stands in the page between two comments; the check compares the page's table with the
rendering, and ``--write`` rewrites it:

    <!-- table from paper_study_cpu_2026-11-30/summary.json: final_loss -->
    | setting | final val loss (nats/byte) | ...
    <!-- end table -->

``FILE`` may be a glob or several paths joined by `` + ``; the function receives them all.

    python benchmarks/docs_figures.py          # every marker and table; exit 1 if any differs
    python benchmarks/docs_figures.py --write  # rewrite the docs' tables from their JSON

``tests/test_docs_results.py`` runs the same check in CI, so a figure that no longer matches its
JSON (or a marker whose file or path is gone) fails the suite.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The figure: the non-space text right before the marker (a number, a date, a name without
# spaces; not a bold's opening **); the marker: from FILE: PATH | SPEC
MARKER = re.compile(r"(?P<figure>[^\s>|(–/#*]+)<!-- from (?P<file>[^:]+): (?P<path>[^|]+?) \| "
                    r"(?P<spec>.*?) ?-->")  # fmt: skip


@dataclass
class Quote:
    doc: str
    line: int
    figure: str
    file: str
    path: str
    spec: str
    value: object = None
    expected: str | None = None
    problem: str | None = None


def documents() -> list[Path]:
    """The pages whose figures are checked: README.md and every docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def lookup(data, path: str):
    """The value at ``path`` (segments separated by ``>``) in a loaded JSON document.

    ``*`` (all elements of a list, all values of a dict) or ``field=value*`` (all elements whose
    ``field`` is ``value``) make the following segments apply to each element, until ``min``,
    ``max`` or ``count`` reduces them to one value."""
    many = False
    for segment in (s.strip() for s in path.split(">")):
        if segment in REDUCERS:
            data, many = REDUCERS[segment](data), False
        elif segment == "*":
            data, many = list(data.values()) if isinstance(data, dict) else data, True
        elif segment.endswith("*") and "=" in segment:
            data, many = _matching(data, segment[:-1]), True
        elif many:
            data = [_step(x, segment) for x in data]
        else:
            data = _step(data, segment)
    return data


REDUCERS = {"min": min, "max": max, "count": len}


def _matching(data: list, conditions: str) -> list:
    """The elements of ``data`` meeting every ``field=value`` of ``conditions`` (joined by ``&``)."""
    pairs = [c.strip().partition("=")[::2] for c in conditions.split("&")]
    return [x for x in data if isinstance(x, dict) and all(str(x.get(f)) == v for f, v in pairs)]


def _step(data, segment: str):
    """One segment: a dict key, a list index, or the one list element with ``field=value``."""
    if not isinstance(data, list):
        return data[segment]
    if "=" not in segment:
        return data[int(segment)]
    matches = _matching(data, segment)
    if len(matches) != 1:
        raise KeyError(f"{len(matches)} elements with {segment}")
    return matches[0]


def render(value, spec: str) -> str:
    """``value`` as the docs print it under ``spec`` (``[*K|/K] format``)."""
    if isinstance(value, str) or not spec:
        return str(value)
    scale = re.match(r"^([*/])([\d.e+-]+)\s*", spec)
    if scale:
        factor = float(scale.group(2))
        value = value * factor if scale.group(1) == "*" else value / factor
        spec = spec[scale.end() :]
    return format(value, spec)


def quotes() -> list[Quote]:
    """Every marked figure of the docs, with its JSON value and any disagreement."""
    found = []
    for doc in documents():
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in MARKER.finditer(line):
                quote = Quote(str(doc.relative_to(REPO)), number, **match.groupdict())
                quote.spec = quote.spec.strip()
                check(quote)
                found.append(quote)
    return found


def check(quote: Quote) -> None:
    """Fill in the quote's value, what the docs should say, and the problem if they differ."""
    path = RESULTS / quote.file
    if not path.is_file():
        quote.problem = f"no results file benchmarks/results/{quote.file}"
        return
    try:
        quote.value = lookup(json.loads(path.read_text()), quote.path)
    except (KeyError, IndexError, ValueError, TypeError) as err:
        quote.problem = f"{quote.file} has no {quote.path!r} ({err})"
        return
    quote.expected = render(quote.value, quote.spec)
    if quote.expected != quote.figure.replace("\u2212", "-"):
        quote.problem = f"says {quote.figure}, {quote.file} says {quote.expected}"


# Tables: rendered whole from their JSON, compared line for line with the page.

TABLE = re.compile(
    r"^<!-- table from (?P<files>.+?): (?P<name>[\w-]+) -->\n(?P<body>.*?)"
    r"^<!-- end table -->$",
    re.S | re.M,
)


@dataclass
class Table:
    doc: str
    line: int
    files: str
    name: str
    body: str
    expected: str | None = None
    problem: str | None = None


def _row(*cells) -> str:
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def _header(*cells) -> list[str]:
    return [_row(*cells), "|" + "---|" * len(cells)]


def _final_loss(files: dict) -> list[str]:
    """docs/results.md: final validation loss and parameter counts of every paper-study setting."""
    labels = {
        "moe-F128": "MoE F = 128",
        "moe-F64": "MoE F = 64",
        "moe-matched": "MoE F = 85 (MoNE ρ = 0.5's activated parameters)",
        "mone-0.25": "MoNE ρ = 0.25",
        "mone-0.5": "MoNE ρ = 0.5",
        "mone-0.75": "MoNE ρ = 0.75",
        "mone-0.5-nolbl": "MoNE ρ = 0.5 without NG-LBL (β = 0)",
    }
    (summary,) = files.values()
    lines = _header(
        "setting",
        "final val loss (nats/byte)",
        "activated/token (neuron top-k)",
        "activated/token (routing)",
        "total",
    )
    for name, s in summary["settings"].items():
        kilo = [f"{s[key] / 1000:.1f} k" for key in ("activated", "activated_moe", "total")]
        lines.append(_row(labels[name], f"{s['mean']:.4f} ± {s['std']:.4f}", *kilo))
    return lines


def _keep_ratio_grid(files: dict) -> list[str]:
    """docs/results.md: held-out loss of each trained MoNE model run at every keep ratio."""
    runs = sorted(
        files.items(), key=lambda f: ("nolbl" in f[0], f[1]["model"]["trained_keep_ratio"])
    )
    ratios = [f"{round(r['keep_ratio'], 2):g}" for r in runs[0][1]["results"]]
    lines = _header("trained at", f"run at {ratios[0]}", *ratios[1:])
    for path, run in runs:
        label = f"ρ = {run['model']['trained_keep_ratio']:g}" + (
            ", no NG-LBL" if "nolbl" in path else ""
        )
        losses = [r["loss"] for r in run["results"]]
        lines.append(
            _row(label, *(f"**{x:.4f}**" if x == min(losses) else f"{x:.4f}" for x in losses))
        )
    return lines


def _mone_fying(files: dict) -> list[str]:
    """docs/results.md: validation loss of a trained MoE continued four ways (mean ± std over seeds)."""
    (study,) = files.values()
    kinds = {
        "moe-continued": "MoE continued (ρ = 1)",
        "mone-fied": "MoNE-fied (ρ = 0.5)",
        "mone-upcycled": "MoNE from upcycled dense",
        "mone-scratch": "MoNE from scratch",
    }
    zero = study["step_zero"]
    lines = _header("steps after the start", *kinds.values())
    lines.append(
        _row(
            "0 (held out, before training)",
            f"{zero['moe']['rho=1']:.4f}",
            f"{zero['moe']['rho=0.5']:.4f}",
            f"{zero['upcycled']['rho=0.5']:.4f} (dense: {zero['upcycled']['rho=1']:.4f})",
            "(random)",
        )
    )
    for step, runs in study["validation"].items():
        lines.append(_row(step, *(f"{runs[k][0]:.4f} ± {runs[k][1]:.3f}" for k in kinds)))
    return lines


def _trainer_throughput(files: dict) -> list[str]:
    """docs/results.md: trainer against a bare megatron-core loop, AVX-512 and AVX2 side by side."""
    contenders = {  # label, whether the ratio's interquartile range is printed
        "bare/moe": ("bare megatron-core MoE loop", False),
        "trainer/moe": ("trainer, MoE", True),
        "trainer/mone": ("trainer, MoNE ρ = 0.5", True),
        "trainer/mone-no-health": ("trainer, MoNE, health metrics off", True),
        "trainer/deepseek-moe": (
            "trainer, DeepSeek-style MoE (shared expert, sigmoid, dense first layer)",
            False,
        ),
        "trainer/deepseek-mone": ("trainer, DeepSeek-style MoNE", False),
    }
    avx512, avx2 = (
        {r["contender"]: r for r in files[f]["results"]}
        for f in sorted(files, key=lambda f: "avx2" in f)
    )

    def ratio(r, iqr):
        if r["contender"].startswith("bare/"):
            return "1"
        low, high = r["ratio_to_bare_iqr"]
        return f"{r['ratio_to_bare']:.3f}" + (f" ({low:.3f}–{high:.3f})" if iqr else "")

    lines = _header(
        "contender", "AVX-512: tokens/s", "/ bare megatron-core loop", "AVX2: tokens/s", "/ bare"
    )
    for name, (label, iqr) in contenders.items():
        a, b = avx512[name], avx2[name]
        lines.append(
            _row(
                label,
                f"{a['tokens_per_s']:,.0f}",
                ratio(a, iqr),
                f"{b['tokens_per_s']:,.0f}",
                ratio(b, iqr),
            )
        )
    return lines


def _memory_plan_check(files: dict) -> list[str]:
    """docs/memory.md: the activation estimate against the measured allocator peak, every case."""
    (check,) = files.values()
    mib = 2**20
    lines = _header(
        "layout",
        "stage",
        "model",
        "seq",
        "micro batch",
        "recompute",
        "estimate MiB",
        "measured peak MiB",
        "error",
        "RSS growth MiB",
    )
    for c in check["cases"]:
        rss = "-" if c.get("rss_growth_bytes") is None else f"{c['rss_growth_bytes'] / mib:.1f}"
        lines.append(
            _row(
                c["layout"],
                c["stage"],
                c["model"],
                c["seq_length"],
                c["micro_batch_size"],
                c["recompute"],
                f"{c['estimate_peak_bytes'] / mib:.1f}",
                f"{c['measured_peak_bytes'] / mib:.1f}",
                f"{c['error']:+.1%}",
                rss,
            )
        )
    return lines


def _decode_expert_mlp(files: dict) -> list[str]:
    """docs/inference.md: sparse-decode speedup of one expert MLP over the dense SwiGLU."""
    (bench,) = files.values()
    rhos = sorted({r["rho"] for r in bench["expert_mlp"]})
    shapes = list(
        dict.fromkeys((r["hidden"], r["neurons"], r["dtype"]) for r in bench["expert_mlp"])
    )
    cell = {
        (r["hidden"], r["neurons"], r["dtype"], r["tokens"], r["rho"]): r
        for r in bench["expert_mlp"]
    }

    def group(shape, tokens):  # dense time (at ρ = 0.5's call) and the speedup at every ρ
        return [
            f"{cell[(*shape, tokens, 0.5)]['dense_ms']:.2f}",
            *(f"{cell[(*shape, tokens, rho)]['speedup']:.2f}×" for rho in rhos),
        ]

    rho_heads = [f"ρ = {rho:g}" for rho in rhos]
    lines = _header(
        "D × F",
        "dtype",
        "dense ms, T = 1",
        f"T = 1, {rho_heads[0]}",
        *rho_heads[1:],
        "dense ms, T = 4",
        f"T = 4, {rho_heads[0]}",
        *rho_heads[1:],
    )
    for shape in shapes:
        lines.append(_row(f"{shape[0]} × {shape[1]}", shape[2], *group(shape, 1), *group(shape, 4)))
    ceilings = [f"{cell[(*shapes[0], 1, rho)]['ceiling_t1']:.2f}×" for rho in rhos]
    lines.append(_row("byte ceiling (T = 1)", "", "", *ceilings, "", *[""] * len(rhos)))
    return lines


def _lm_eval_parity(files: dict) -> list[str]:
    """docs/evaluation.md: mone-eval's and lm-evaluation-harness's acc / acc_norm per model and
    task."""
    (result,) = files.values()
    lines = _header("model", "exported as", "task", "examples", "mone-eval acc / acc_norm",
                    "lm-eval acc / acc_norm", "equal")  # fmt: skip
    for flavour, model in result["models"].items():
        for name, task in model["tasks"].items():
            ours, theirs = (f"{t['acc']:.4f} / {t['acc_norm']:.4f}"
                            for t in (task["mone_eval"], task["lm_eval"]))  # fmt: skip
            lines.append(_row(flavour, f"`{model['architecture']}`", f"`{name}`",
                              task["examples"], ours, theirs, "yes" if task["equal"] else "no"))  # fmt: skip
    return lines


def _layout_search_published(files: dict) -> list[str]:
    """docs/memory.md: the layout search against published runs (grouped experts)."""
    (result,) = files.values()

    def layout(d: dict) -> str:
        return "/".join(str(d[k]) for k in ("tp", "pp", "ep", "micro_batch", "vpp"))

    def signed(x: float) -> str:
        return f"{x:+.0%}".replace("-", "−").replace("%", " %")

    lines = _header("run", "GPUs", "published TP/PP/EP/mb/VPP", "fits", "rank among ours",
                    "published MFU", "predicted MFU", "error",
                    "our best TP/PP/EP/mb/VPP (MFU)", "published vs our best")  # fmt: skip
    for r in result["runs"]["grouped"]:
        best, predicted = r["our_best"], r["predicted_mfu"]
        published = r["published_mfu_our_formula"]
        lines.append(_row(r["name"], r["gpus"], layout(r["published_layout"]),
                          "yes" if r["fits"] else "no", f"{r['rank']} of {r['layouts_ranked']}",
                          f"{published:.1%}".replace("%", " %"), f"{predicted:.1%}".replace("%", " %"),
                          signed(predicted / published - 1),
                          f"{layout(best)} ({best['mfu']:.1%})".replace("%", " %"),
                          signed(predicted / best["mfu"] - 1)))  # fmt: skip
    return lines


TABLES = {
    "layout_search_published": _layout_search_published,
    "final_loss": _final_loss,
    "keep_ratio_grid": _keep_ratio_grid,
    "mone_fying": _mone_fying,
    "trainer_throughput": _trainer_throughput,
    "memory_plan_check": _memory_plan_check,
    "decode_expert_mlp": _decode_expert_mlp,
    "lm_eval_parity": _lm_eval_parity,
}


def rendered(files: str, name: str) -> str:
    """The table ``name`` rendered from ``files`` (paths or globs under benchmarks/results/,
    joined by `` + ``), as the lines between its two comments."""
    paths = [p for pattern in files.split(" + ") for p in sorted(RESULTS.glob(pattern.strip()))]
    if not paths:
        raise FileNotFoundError(f"no results file benchmarks/results/{files}")
    data = {str(p.relative_to(RESULTS)): json.loads(p.read_text()) for p in paths}
    return "\n".join(TABLES[name](data)) + "\n"


def tables() -> list[Table]:
    """Every rendered table of the docs, with what it should say and any disagreement."""
    found = []
    for doc in documents():
        text = doc.read_text()
        for match in TABLE.finditer(text):
            table = Table(
                str(doc.relative_to(REPO)),
                text.count("\n", 0, match.start()) + 1,
                **match.groupdict(),
            )
            try:
                table.expected = rendered(table.files, table.name)
            except (KeyError, IndexError, ValueError, TypeError, FileNotFoundError) as err:
                table.problem = f"table {table.name!r} from {table.files}: {err!r}"
            else:
                if table.expected != table.body:
                    table.problem = f"table {table.name!r} differs from {table.files}: {_first_difference(table)}"
            found.append(table)
    return found


def _first_difference(table: Table) -> str:
    for says, should in zip(table.body.splitlines() + [""], table.expected.splitlines() + [""]):
        if says != should:
            return f"says {says!r}, should say {should!r}"
    return "differs"


def write_tables() -> int:
    """Rewrite every rendered table of the docs from its JSON; the number of tables changed."""
    changed = 0
    for doc in documents():
        text = doc.read_text()

        def fill(match):
            nonlocal changed
            expected = rendered(match["files"], match["name"])
            changed += expected != match["body"]
            return f"<!-- table from {match['files']}: {match['name']} -->\n{expected}<!-- end table -->"

        new = TABLE.sub(fill, text)
        if new != text:
            doc.write_text(new)
    return changed


def main() -> int:
    if sys.argv[1:] == ["--write"]:
        print(f"{write_tables()} tables rewritten")
    found, found_tables = quotes(), tables()
    bad = [q for q in found if q.problem]
    for q in found:
        mark = "DIFFERS" if q.problem else "ok"
        print(f"{q.doc}:{q.line:<5} {q.figure:>12}  {q.file}: {q.path}  {mark}")
    for t in found_tables:
        mark = "DIFFERS" if t.problem else "ok"
        print(f"{t.doc}:{t.line:<5} {'table':>12}  {t.files}: {t.name}  {mark}")
    for q in bad:
        print(f"{q.doc}:{q.line}: {q.problem}", file=sys.stderr)
    bad_tables = [t for t in found_tables if t.problem]
    for t in bad_tables:
        print(f"{t.doc}:{t.line}: {t.problem}", file=sys.stderr)
    print(
        f"{len(found)} figures checked, {len(bad)} differ; "
        f"{len(found_tables)} tables checked, {len(bad_tables)} differ"
    )
    return 1 if bad or bad_tables else 0


if __name__ == "__main__":
    sys.exit(main())
