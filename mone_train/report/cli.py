"""``mone-report``: compare finished runs (a rho sweep, its MoE baselines) in a table and plots.

    mone-report runs/sweeps                          # every run directory found below
    mone-report runs/sweeps/rho/2026-11-30_10-00-00 runs/my-moe-run --out reports/rho

A run directory is one ``mone-train`` wrote: ``config.yaml`` (the resolved config),
``params.json`` (parameter counts) and ``metrics.jsonl``. Folders are searched recursively. A
run counts when its last validation loss was logged at its final step (``trainer.steps``);
every other run found is listed as skipped, with the reason.

Runs that differ only in ``trainer.seed`` (and where they ran: run directory, threads, logging)
are one setting: the table then has a row per setting with the losses as mean ± sample standard
deviation over its seeds, and the plots draw the mean with a ±1 std band or error bar. A seed
sweep is one override: ``mone-train --multirun trainer.seed=1,2,3 ...``.

Writes into ``--out`` (default ``<first input>/report``):

    report.md                  the table: final and best validation loss, activated parameters
                               per token both ways (docs/method.md), total parameters,
                               median tokens/s, steps
    report.json                the same rows, and the skipped runs with reasons
    val_loss.png               validation loss against steps, one line per run
    loss_vs_activated.png      final validation loss against activated parameters per token,
                               counted with the neuron top-k (left) and with routing alone
                               (right); MoE and MoNE marked apart
    tasks.png                  downstream accuracy (bits per byte for text tasks) against steps,
                               a panel per task, a line per run and keep ratio (runs with
                               in-loop tasks, docs/evaluation.md)
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mone_train.command_line import CommandParser
from mone_train.errors import ConfigError, report_failure

# in-loop task headline keys: accuracy (multiple-choice, continuation), bits per byte (text)
TASK_HEADLINE = re.compile(r"(?:rho([^/]+)/)?task/(.+)/(acc|bits_per_byte)")
HEADLINE_LABELS = {"acc": "accuracy", "bits_per_byte": "bits per byte"}
RUN_FILES = ("metrics.jsonl", "config.yaml", "params.json")
NOT_RUNS = {".hydra", "wandb", "checkpoints"}  # folders inside a run that hold similar files


@dataclass
class RunRow:
    """One finished run, as reported."""

    run_dir: str
    label: str
    flavour: str
    neuron_keep_ratio: float
    moe_ffn_hidden_size: int
    model: str
    steps: int
    final_val_loss: float
    best_val_loss: float
    test_loss: float | None
    activated: int | None  # per token, with the neuron top-k (MoNE count)
    activated_moe: int | None  # per token, routing alone (MoE count)
    total: int | None
    tokens_per_s: float | None
    val_curve: list[tuple[int, float]]
    seed: int | None = None
    setting: str = ""  # the config without what seeds and locations change (grouping key)
    # downstream headline against steps: "<task>" or "<task> rho=<r>" -> [(step, value)]
    task_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    task_metrics: dict[str, str] = field(default_factory=dict)  # task -> acc | bits_per_byte


@dataclass
class RunGroup:
    """Runs that differ only in seed (a single run is a group of one)."""

    rows: list[RunRow]

    @property
    def first(self) -> RunRow:
        return self.rows[0]

    def stat(self, key: str) -> tuple[float, float]:
        """Mean and sample standard deviation (0 for one run) of a row field."""
        values = [float(getattr(r, key)) for r in self.rows]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def mean_curve(self) -> tuple[list[int], list[float], list[float]]:
        """Validation steps every run logged, the mean loss and its standard deviation there."""
        common = set.intersection(*(set(dict(r.val_curve)) for r in self.rows))
        steps = sorted(common)
        curves = [dict(r.val_curve) for r in self.rows]
        means = [statistics.fmean(c[s] for c in curves) for s in steps]
        stds = [statistics.stdev(c[s] for c in curves) if len(curves) > 1 else 0.0 for s in steps]
        return steps, means, stds


# Config keys that say where or with which seed a run went, not what was trained: runs equal in
# everything else are one setting (seed groups).
NOT_SETTING = {
    "trainer": {
        "seed",
        "run_dir",
        "resume",
        "force_resume",
        "num_threads",
        "init_timeout_s",
        "save_interval",
        "keep_last",
        "async_save",  # when and how checkpoints were written
    },
    "data": {"cache_dir", "index_cache_dir"},
    "logging": None,  # all of it
}


def setting_of(cfg: dict) -> str:
    """A canonical text of the config without the NOT_SETTING keys."""
    kept = {}
    for section, values in cfg.items():
        drop = NOT_SETTING.get(section, set())
        if drop is None:
            continue
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k not in drop}
        kept[section] = values
    return json.dumps(kept, sort_keys=True, default=str)


def group_runs(rows: list[RunRow]) -> list[RunGroup]:
    """Rows grouped by setting, in the rows' order, each group ordered by seed."""
    groups: dict[str, list[RunRow]] = {}
    for row in rows:
        groups.setdefault(row.setting, []).append(row)
    return [
        RunGroup(sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.run_dir)))
        for members in groups.values()
    ]


def find_run_dirs(inputs: list[Path]) -> list[Path]:
    """Folders holding any run file (or Hydra's ``.hydra``), in sorted order."""
    found: set[Path] = set()
    for root in inputs:
        if not root.is_dir():
            raise ReportError(f"{root} is not a directory")
        candidates = [root, *(p for p in root.rglob("*") if p.is_dir())]
        for folder in candidates:
            if set(folder.relative_to(root).parts) & NOT_RUNS:
                continue
            if any((folder / name).is_file() for name in RUN_FILES) or (folder / ".hydra").is_dir():
                found.add(folder)
    return sorted(found)


class ReportError(ConfigError):
    """Bad input to mone-report; the message names the path."""


def read_run(folder: Path) -> RunRow | str:
    """The run's row, or the reason it is skipped."""
    metrics_file, config_file = folder / "metrics.jsonl", folder / "config.yaml"
    if not config_file.is_file():
        return "no config.yaml (not started by mone-train?)"
    if not metrics_file.is_file():
        return "no metrics.jsonl (failed before its first log?)"
    try:
        cfg = yaml.safe_load(config_file.read_text())
        steps_planned = int(cfg["trainer"]["steps"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        return f"unreadable config.yaml ({err})"
    records = []
    for number, line in enumerate(metrics_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A line cut off by a crash can only be the last one.
            return f"metrics.jsonl line {number} is not JSON"
    curve = [(int(r["step"]), float(r["val_loss"])) for r in records if "val_loss" in r]
    if not curve:
        return "unfinished: no validation loss logged"
    last_step = max(int(r.get("step", 0)) for r in records)
    if curve[-1][0] < steps_planned:
        return f"unfinished: last logged step {last_step} of {steps_planned}"
    rates = [float(r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
    tests = [float(r["test_loss"]) for r in records if "test_loss" in r]
    params = {}
    if (folder / "params.json").is_file():
        try:
            params = json.loads((folder / "params.json").read_text())
        except ValueError:
            return "params.json is not JSON"
    flavour = cfg.get("moe", {}).get("flavour", "?")
    rho = float(cfg.get("moe", {}).get("neuron_keep_ratio", 1.0)) if flavour == "mone" else 1.0
    return RunRow(
        run_dir=str(folder),
        label="",
        flavour=flavour,
        neuron_keep_ratio=rho,
        moe_ffn_hidden_size=int(cfg.get("model", {}).get("moe_ffn_hidden_size", 0)),
        model=str(cfg.get("model", {}).get("name", "?")),
        steps=curve[-1][0],
        final_val_loss=curve[-1][1],
        best_val_loss=min(v for _, v in curve),
        test_loss=tests[-1] if tests else None,
        activated=params.get("activated"),
        activated_moe=params.get("activated_moe"),
        total=params.get("total"),
        tokens_per_s=statistics.median(rates) if rates else None,
        val_curve=curve,
        seed=cfg.get("trainer", {}).get("seed"),
        setting=setting_of(cfg),
        task_curves=task_curves(records),
        task_metrics=task_metrics(records),
    )


def _label(groups: list[RunGroup]) -> None:
    for group in groups:
        r = group.first
        label = (
            f"MoNE rho={r.neuron_keep_ratio:g}"
            if r.flavour == "mone"
            else f"MoE F={r.moe_ffn_hidden_size}"
        )
        for row in group.rows:
            row.label = label
    seen: dict[str, int] = {}
    for group in groups:
        seen[group.first.label] = seen.get(group.first.label, 0) + 1
    for group in groups:  # different settings, same label (other lengths, ...): name the folder
        if seen[group.first.label] > 1:
            folder = Path(group.first.run_dir)
            name = folder.parent.name if len(group.rows) > 1 else folder.name
            for row in group.rows:
                row.label += f" ({name})"


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}M"


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"


def markdown_table(groups: list[RunGroup], skipped: list[tuple[str, str]]) -> str:
    """One row per setting. When some setting has several seeds, a ``seeds`` column and the
    losses as mean ± sample standard deviation; otherwise one plain row per run."""
    seeded = any(len(g.rows) > 1 for g in groups)
    columns = ["run", "flavour", "rho", "F", "steps", *(["seeds"] if seeded else []),
               "final val loss", "best val loss", "activated/token (neuron top-k)",
               "activated/token (routing)", "total params", "tokens/s"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for g in groups:
        r, n = g.first, len(g.rows)
        rates = [x.tokens_per_s for x in g.rows if x.tokens_per_s is not None]
        cells = [
            r.label, r.flavour, f"{r.neuron_keep_ratio:g}", str(r.moe_ffn_hidden_size),
            str(r.steps), *([",".join(str(x.seed) for x in g.rows)] if seeded else []),
            _pm(*g.stat("final_val_loss"), n), _pm(*g.stat("best_val_loss"), n),
            _millions(r.activated), _millions(r.activated_moe), _millions(r.total),
            f"{statistics.median(rates):,.0f}" if rates else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if skipped:
        out += "\nSkipped:\n\n" + "".join(f"- `{d}`: {why}\n" for d, why in skipped)
    return out


def plot_curves(groups: list[RunGroup], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        steps, means, stds = g.mean_curve()
        style = "-" if g.first.flavour == "mone" else "--"
        label = g.first.label + (f" (mean of {len(g.rows)} seeds)" if len(g.rows) > 1 else "")
        (line,) = ax.plot(steps, means, style, marker=".", label=label)
        if len(g.rows) > 1:
            low = [m - s for m, s in zip(means, stds)]
            high = [m + s for m, s in zip(means, stds)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The headline against steps of every task the run evaluated (``task/<t>/acc``, or
    ``task/<t>/bits_per_byte`` for text tasks), and at each extra keep ratio
    (``rho<r>/task/<t>/...``, named ``"<t> rho=<r>"``)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            match = TASK_HEADLINE.fullmatch(key)
            if match is None or value is None:
                continue
            ratio, task, _ = match.groups()
            name = task + (f" rho={ratio}" if ratio else "")
            curves.setdefault(name, []).append((int(record["step"]), float(value)))
    return curves


def task_metrics(records: list[dict]) -> dict[str, str]:
    """Task -> the metric its curve shows (``acc`` or ``bits_per_byte``)."""
    found = (TASK_HEADLINE.fullmatch(key) for record in records for key in record)
    return {m.group(2): m.group(3) for m in found if m is not None and m.group(1) is None}


def plot_tasks(groups: list[RunGroup], path: Path) -> None:
    """Downstream scores against steps: one panel per task, a line per run (and keep ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n.split(" rho=")[0] for g in groups for n in g.first.task_curves})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, task in zip(axes[0], names):
        for g in groups:
            for name, curve in sorted(g.first.task_curves.items()):
                if name.split(" rho=")[0] != task:
                    continue
                rho = name.partition(" rho=")[2]
                label = g.first.label + (f" at rho={rho}" if rho else "")
                ax.plot(*zip(*curve), ":" if rho else "-", marker=".", label=label)
        metric = next((g.first.task_metrics[task] for g in groups
                       if task in g.first.task_metrics), "acc")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(HEADLINE_LABELS[metric])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_vs_activated(groups: list[RunGroup], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    kinds = [("activated", "with the neuron top-k"), ("activated_moe", "routing alone")]
    for ax, (key, how) in zip(axes, kinds):
        for flavour, marker, colour, name in [
            ("mone", "^", "tab:blue", "MoNE"),
            ("moe", "o", "tab:red", "MoE"),
        ]:
            points = [
                (getattr(g.first, key) / 1e6, *g.stat("final_val_loss"), g.first)
                for g in groups
                if g.first.flavour == flavour and getattr(g.first, key) is not None
            ]
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            xs, ys, errs, which = zip(*points)
            ax.errorbar(
                xs, ys, yerr=errs if any(errs) else None, marker=marker, color=colour,
                linestyle=":", label=name, ms=8, capsize=3,
            )  # fmt: skip
            for x, y, r in zip(xs, ys, which):
                text = (
                    f"rho={r.neuron_keep_ratio:g}"
                    if flavour == "mone"
                    else f"F={r.moe_ffn_hidden_size}"
                )
                # MoNE labels above the point, MoE below: rho = 1 and MoE coincide
                offset = (4, 5) if flavour == "mone" else (4, -11)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
        ax.set_xlabel(f"activated parameters per token, {how} (M)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("final validation loss (nats/token)")
    fig.suptitle("Final validation loss against activated parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(inputs: list[Path], out: Path) -> dict:
    """Read runs below ``inputs``, write the report into ``out``; return what was written."""
    folders = find_run_dirs(inputs)
    out = out.resolve()
    rows, skipped = [], []
    for folder in folders:
        if folder.resolve() == out:
            continue
        result = read_run(folder)
        if isinstance(result, str):
            skipped.append((str(folder), result))
        else:
            rows.append(result)
    if not rows:
        found = (
            f"{len(folders)} run directories, none finished" if folders else "no run directories"
        )
        raise ReportError(f"nothing to report in {', '.join(map(str, inputs))}: {found}")
    rows.sort(key=lambda r: (r.flavour != "moe", r.neuron_keep_ratio, -r.moe_ffn_hidden_size))
    groups = group_runs(rows)
    _label(groups)
    seeded = any(len(g.rows) > 1 for g in groups)
    table = markdown_table(groups, skipped)
    out.mkdir(parents=True, exist_ok=True)
    text = "# Run comparison\n\n"
    if seeded:
        text += "Runs that differ only in `trainer.seed` are one row: mean ± sample std.\n\n"
    (out / "report.md").write_text(text + table)
    (out / "report.json").write_text(
        json.dumps(
            {
                "runs": [{k: v for k, v in asdict(r).items() if k != "setting"} for r in rows],
                "groups": [_group_record(g) for g in groups],
                "skipped": [{"run_dir": d, "reason": why} for d, why in skipped],
            },
            indent=2,
        )
    )
    plot_curves(groups, out / "val_loss.png")
    plot_loss_vs_activated(groups, out / "loss_vs_activated.png")
    if any(g.first.task_curves for g in groups):
        plot_tasks(groups, out / "tasks.png")
    return {"out": out, "rows": rows, "groups": groups, "table": table, "skipped": skipped}


def _group_record(group: RunGroup) -> dict:
    r = group.first
    final, best = group.stat("final_val_loss"), group.stat("best_val_loss")
    return {
        "label": r.label,
        "flavour": r.flavour,
        "neuron_keep_ratio": r.neuron_keep_ratio,
        "moe_ffn_hidden_size": r.moe_ffn_hidden_size,
        "steps": r.steps,
        "seeds": [x.seed for x in group.rows],
        "run_dirs": [x.run_dir for x in group.rows],
        "final_val_loss_mean": final[0],
        "final_val_loss_std": final[1],
        "best_val_loss_mean": best[0],
        "best_val_loss_std": best[1],
        "activated": r.activated,
        "activated_moe": r.activated_moe,
        "total": r.total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="mone-report",
        description=__doc__.split("\n")[0],
        examples=(
            "mone-report runs/sweeps                      # a keep-ratio sweep and its baselines",
            "mone-report runs/mone-r50 runs/moe --out reports/r50-vs-moe",
        ),
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or folders of them")
    parser.add_argument("--out", type=Path, help="output folder (default: <first input>/report)")
    try:
        args = parser.parse_args(argv)
        result = build_report(args.runs, args.out or args.runs[0] / "report")
    except ConfigError as err:
        return report_failure("mone-report", err)
    print(result["table"].split("\nSkipped:")[0], end="")
    for folder, why in result["skipped"]:
        print(f"skipped {folder}: {why}")
    print(f"wrote {result['out']}/report.md, report.json, val_loss.png, loss_vs_activated.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
