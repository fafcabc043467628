"""Neuron activation magnitudes inside the activated experts: histogram, CDF, heatmap, thresholds.

For the chosen layers and experts, every (token, expert) row's ``|act(gate)|`` (|SiLU(gate)| for
SwiGLU experts) is recorded before any neuron selection, while the model runs as it is (a MoNE
checkpoint still keeps its trained K for its outputs). Memory is bounded whatever the number of
tokens: counts go into fixed log-spaced bins, exact counts under each threshold and sums are
accumulated, and only the first rows of one expert are kept for the heatmap.

Bins: 20 per decade from 1e-6 to 1e2 (160 bins); values below 1e-6 (exact zeros included) are
the underflow bin, values from 1e2 up the overflow bin. ``histogram[0]`` is the underflow,
``histogram[1:-1]`` the bins, ``histogram[-1]`` the overflow; ``cdf[i]`` is the fraction of
values below ``edges[i]`` (exact at the edges).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from mone_train.analysis.outputs import pyplot, save_figure, write_json

EDGES = np.logspace(-6, 2, 161)
FILES = (
    "activations.json",
    "activations_hist.png",
    "activations_cdf.png",
    "activations_heatmap.png",
    "activations_thresholds.png",
)


class _Accumulator:
    """Counts for one group of values (an expert, a layer, or everything)."""

    def __init__(self, num_thresholds: int) -> None:
        self.histogram = np.zeros(len(EDGES) + 1, dtype=np.int64)
        self.under = np.zeros(num_thresholds, dtype=np.int64)
        self.count = 0
        self.rows = 0
        self.total = 0.0

    def add(self, other: _Accumulator) -> None:
        self.histogram += other.histogram
        self.under += other.under
        self.count += other.count
        self.rows += other.rows
        self.total += other.total

    def summary(self, thresholds: list[float], with_histogram: bool) -> dict:
        count = max(self.count, 1)
        out = {
            "rows": self.rows,
            "count": self.count,
            "mean": self.total / count,
            "fraction_under": {str(t): float(u) / count for t, u in zip(thresholds, self.under)},
        }
        if with_histogram:
            out["histogram"] = self.histogram.tolist()
            out["cdf"] = (np.cumsum(self.histogram)[:-1] / count).tolist()
        return out


class ActivationStats:
    """Recorder for :class:`~mone_train.analysis.neurons.NeuronControl`: bounded statistics of
    ``|g|`` per (layer, expert), and the first ``heatmap_rows`` rows of one expert."""

    def __init__(
        self,
        layers: list[int],
        experts: list[int] | None,
        thresholds: list[float],
        heatmap: tuple[int, int],
        heatmap_rows: int,
    ) -> None:
        self.layers = set(layers)
        self.experts = None if experts is None else set(experts)
        self.thresholds = thresholds
        self.heatmap_key = heatmap
        self.heatmap_rows = heatmap_rows
        self.heatmap: list[np.ndarray] = []
        self.heatmap_count = 0
        self.per_expert: dict[tuple[int, int], _Accumulator] = {}
        self._edges = {}  # device -> edges tensor
        self._thresholds = {}

    def __call__(self, layer: int, expert: int, g_abs_TF: torch.Tensor) -> None:
        if layer not in self.layers or (self.experts is not None and expert not in self.experts):
            return
        key = (layer, expert)
        acc = self.per_expert.get(key)
        if acc is None:
            acc = self.per_expert[key] = _Accumulator(len(self.thresholds))
        values_TF = g_abs_TF.float()
        device = values_TF.device
        if device not in self._edges:
            self._edges[device] = torch.tensor(EDGES, dtype=torch.float32, device=device)
            self._thresholds[device] = torch.tensor(self.thresholds, device=device)
        # right=True: index 0 below edges[0], i for edges[i-1] <= v < edges[i], last from edges[-1]
        bins = torch.bucketize(values_TF.reshape(-1), self._edges[device], right=True)
        acc.histogram += torch.bincount(bins, minlength=len(EDGES) + 1).cpu().numpy()
        under = (values_TF.reshape(-1, 1) < self._thresholds[device]).sum(dim=0)
        acc.under += under.cpu().numpy()
        acc.count += values_TF.numel()
        acc.rows += values_TF.shape[0]
        acc.total += float(values_TF.double().sum())
        if key == self.heatmap_key and self.heatmap_count < self.heatmap_rows:
            take = values_TF[: self.heatmap_rows - self.heatmap_count]
            self.heatmap.append(take.cpu().numpy())
            self.heatmap_count += take.shape[0]

    def result(self) -> dict:
        """The statistics as a JSON-ready record (see docs/analysis.md)."""
        overall = _Accumulator(len(self.thresholds))
        per_layer: dict[int, _Accumulator] = {}
        for (layer, _), acc in sorted(self.per_expert.items()):
            per_layer.setdefault(layer, _Accumulator(len(self.thresholds))).add(acc)
            overall.add(acc)
        return {
            "thresholds": self.thresholds,
            "bins": {
                "edges": EDGES.tolist(),
                "underflow_below": EDGES[0],
                "overflow_from": EDGES[-1],
            },
            "overall": overall.summary(self.thresholds, with_histogram=True),
            "per_layer": {
                str(layer): acc.summary(self.thresholds, with_histogram=True)
                for layer, acc in sorted(per_layer.items())
            },
            "per_expert": [
                {"layer": layer, "expert": expert, **acc.summary(self.thresholds, False)}
                for (layer, expert), acc in sorted(self.per_expert.items())
            ],
        }

    def heatmap_matrix(self) -> np.ndarray:
        """[rows, F] magnitudes of the heatmap expert's first rows (may have 0 rows)."""
        if not self.heatmap:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(self.heatmap, axis=0)


def run_activations(model, batches, stats: ActivationStats, progress: bool = True) -> dict:
    """Run ``model`` over ``batches`` recording ``stats``; return the result record."""
    start = time.perf_counter()
    control = model.control
    control.recorder = stats
    loss_total, count = 0.0, 0
    try:
        for batch in tqdm(
            batches,
            total=batches.max_batches,
            desc="activations",
            unit="batch",
            disable=not progress,
        ):
            loss_sum, n = model.loss_sum(batch)
            loss_total += loss_sum
            count += n
    finally:
        control.recorder = None
        control.reset_tally()
    heatmap = stats.heatmap_matrix()
    layer, expert = stats.heatmap_key
    return {
        "study": "activations",
        "model": model.describe(),
        "activation": "|act(gate)| of every (token, activated expert) row, before neuron selection",
        "num_tokens": count,
        "loss": loss_total / max(count, 1),
        "layers": sorted(stats.layers),
        "experts": "all" if stats.experts is None else sorted(stats.experts),
        **stats.result(),
        "heatmap": {
            "layer": layer,
            "expert": expert,
            "rows": int(heatmap.shape[0]),
            "num_neurons": model.num_neurons,
        },
        "seconds": time.perf_counter() - start,
    }


def format_summary(result: dict) -> str:
    """Terminal lines: the fraction under each threshold per layer and overall."""
    thresholds = result["thresholds"]
    head = f"{'layer':>7}  {'values':>12}  {'mean':>8}  " + "  ".join(
        f"{'< ' + str(t):>9}" for t in thresholds
    )
    lines = [head, "-" * len(head)]
    groups = [(name, entry) for name, entry in result["per_layer"].items()]
    groups.append(("all", result["overall"]))
    for name, entry in groups:
        fractions = "  ".join(f"{entry['fraction_under'][str(t)]:>9.3f}" for t in thresholds)
        lines.append(f"{name:>7}  {entry['count']:>12,}  {entry['mean']:>8.4f}  {fractions}")
    return "\n".join(lines)


def write_activations(result: dict, heatmap: np.ndarray, paths: dict) -> None:
    """The JSON record and the four figures."""
    write_json(paths["activations.json"], result)
    plt = pyplot()
    thresholds = result["thresholds"]
    edges = np.asarray(result["bins"]["edges"])
    centers = np.sqrt(edges[:-1] * edges[1:])
    groups = [(f"layer {k}", v) for k, v in result["per_layer"].items()]
    groups.append(("all", result["overall"]))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, entry in groups:
        counts = np.asarray(entry["histogram"][1:-1], dtype=np.float64)
        ax.plot(centers, counts / max(entry["count"], 1), label=name, lw=2 if name == "all" else 1)
    _threshold_lines(ax, thresholds)
    ax.set_xscale("log")
    ax.set_xlabel("|act(gate)| (log scale; 20 bins per decade)")
    ax.set_ylabel("fraction of activations per bin")
    ax.set_title("Neuron activation magnitudes in activated experts", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, paths["activations_hist.png"])

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, entry in groups:
        ax.plot(edges, entry["cdf"], label=name, lw=2 if name == "all" else 1)
    _threshold_lines(ax, thresholds)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("|act(gate)|")
    ax.set_ylabel("fraction of activations below")
    ax.set_title("CDF of neuron activation magnitudes", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, paths["activations_cdf.png"])

    info = result["heatmap"]
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    if heatmap.size:
        from matplotlib.colors import LogNorm

        top = max(float(heatmap.max()), 2e-4)
        image = ax.imshow(
            np.clip(heatmap, 1e-4, None),
            aspect="auto",
            interpolation="nearest",
            norm=LogNorm(vmin=1e-4, vmax=top),
            cmap="viridis",
        )
        fig.colorbar(image, ax=ax, label="|act(gate)| (values below 1e-4 shown at 1e-4)")
    else:
        ax.text(0.5, 0.5, "no tokens were routed to this expert", ha="center", va="center")
    ax.set_xlabel("neuron")
    ax.set_ylabel("token (in the order routed to the expert)")
    ax.set_title(
        f"layer {info['layer']} expert {info['expert']}: first {info['rows']} tokens", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, paths["activations_heatmap.png"])

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / max(len(thresholds), 1)
    positions = np.arange(len(groups))
    for i, t in enumerate(thresholds):
        heights = [entry["fraction_under"][str(t)] for _, entry in groups]
        ax.bar(positions + i * width, heights, width, label=f"|act(gate)| < {t}")
    ax.set_xticks(positions + width * (len(thresholds) - 1) / 2, [name for name, _ in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of activations")
    ax.set_title("Activations under each threshold", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, paths["activations_thresholds.png"])


def _threshold_lines(ax, thresholds: list[float]) -> None:
    for t in thresholds:
        ax.axvline(t, color="grey", linestyle=":", lw=1)
