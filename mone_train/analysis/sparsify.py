"""The sparsification study: held-out loss when every activated expert keeps only its strongest
neurons.

For each pruning fraction p, inside every routed expert that a token activates, only the
K = max(1, round((1 - p) * F)) neurons with the largest |act(gate)| are kept for that token
(ties to the lower neuron index); the others contribute nothing. The data are read once: each
batch is evaluated at every setting before the next batch is read. The model as it is (its own
expert computation, no hooks acting) is evaluated too, as the reference the table compares to.
"""

from __future__ import annotations

import math
import time

from tqdm import tqdm

from mone_train.analysis.neurons import KeptTally
from mone_train.analysis.outputs import pyplot, save_figure, write_json

DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FILES = ("sparsify.json", "sparsify.png")
OWN = "own"  # the setting key of the model's own computation


def run_sparsify(model, batches, fractions: list[float], progress: bool = True) -> dict:
    """Evaluate ``model`` on ``batches`` at every pruning fraction; return the result record."""
    from mone_kernels import num_kept_neurons

    num_neurons = model.num_neurons
    # Fractions that give the same K share one evaluation; the model's own K is the reference.
    setting_of = {}
    for p in fractions:
        k = num_kept_neurons(1.0 - p, num_neurons)
        setting_of[p] = OWN if k == model.native_num_kept else k
    settings = [OWN, *sorted({s for s in setting_of.values() if s != OWN}, reverse=True)]
    sums = {s: [0.0, 0] for s in settings}
    tallies = {s: KeptTally() for s in settings}

    start = time.perf_counter()
    bar = tqdm(
        total=batches.max_batches * len(settings),
        desc="sparsify",
        unit="forward",
        disable=not progress,
    )
    control = model.control
    try:
        for batch in batches:
            for setting in settings:
                control.keep_ratio = None if setting == OWN else setting / num_neurons
                loss_sum, count = model.loss_sum(batch)
                sums[setting][0] += loss_sum
                sums[setting][1] += count
                done = control.reset_tally()
                tallies[setting].add(done.rows, done.min_kept or 0, done.max_kept or 0)
                bar.update(1)
            bar.set_postfix(loss=f"{sums[OWN][0] / sums[OWN][1]:.4f}")
    finally:
        control.keep_ratio = None
        bar.close()

    def loss_of(setting) -> float:
        return sums[setting][0] / sums[setting][1]

    reference = loss_of(OWN)
    rows = []
    for p in fractions:
        setting = setting_of[p]
        tally = tallies[setting]
        loss = loss_of(setting)
        rows.append(
            {
                "p": p,
                "keep_ratio": 1.0 - p,
                "num_kept": num_kept_neurons(1.0 - p, num_neurons),
                "kept_per_row_min": tally.min_kept,
                "kept_per_row_max": tally.max_kept,
                "rows": tally.rows,
                "loss": loss,
                "perplexity": _perplexity(loss),
                "delta_loss": loss - reference,
                "own_computation": setting == OWN,
            }
        )
    return {
        "study": "sparsify",
        "model": model.describe(),
        "num_neurons": num_neurons,
        "num_tokens": sums[OWN][1],
        "reference": {
            "loss": reference,
            "perplexity": _perplexity(reference),
            "num_kept": model.native_num_kept,
        },
        "results": rows,
        "seconds": time.perf_counter() - start,
    }


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def format_table(result: dict) -> str:
    """The terminal table of a result record."""
    f = result["num_neurons"]
    ref = result["reference"]
    lines = [
        f"{'p':>6}  {'kept K/F':>10}  {'loss':>9}  {'perplexity':>11}  {'vs model':>9}",
        "-" * 53,
    ]
    for row in result["results"]:
        lines.append(
            f"{row['p']:>6.3f}  {row['num_kept']:>5}/{f:<4}  {row['loss']:>9.4f}  "
            f"{row['perplexity']:>11.3f}  {row['delta_loss']:>+9.4f}"
        )
    lines.append(
        f"model as trained (K = {ref['num_kept']}/{f}): loss {ref['loss']:.4f}, perplexity "
        f"{ref['perplexity']:.3f}, over {result['num_tokens']:,} predicted tokens"
    )
    return "\n".join(lines)


def write_sparsify(result: dict, paths: dict) -> None:
    """The JSON record and the loss-against-p curve."""
    write_json(paths["sparsify.json"], result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ps = [row["p"] for row in result["results"]]
    losses = [row["loss"] for row in result["results"]]
    ax.plot(ps, losses, marker="o", label="pruned activated experts")
    ax.axhline(result["reference"]["loss"], color="grey", linestyle="--", label="model as trained")
    trained = result["model"].get("trained_keep_ratio", 1.0)
    if trained < 1.0:
        label = f"trained keep ratio rho={trained:g} (p = {1.0 - trained:g})"
        ax.axvline(1.0 - trained, color="tab:green", linestyle=":", label=label)
    ax.set_xlabel("p: fraction of each activated expert's neurons pruned per token")
    ax.set_ylabel("held-out loss (nats / token)")
    model = result["model"]
    name = model.get("class") or f"mone-train {model.get('flavour')}"
    ax.set_title(f"{name}: neurons kept by |act(gate)| (F = {result['num_neurons']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, paths["sparsify.png"])
