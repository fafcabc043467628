"""Result files: checked before any work, written atomically, never overwritten by accident."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mone_train.analysis.errors import AnalysisError


def plan_outputs(out: str, names: list[str], overwrite: bool) -> dict[str, Path]:
    """Paths of the result files ``names`` under ``out``; refuses existing ones without
    ``overwrite``. Creates nothing (the folder is made when the first result is written)."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AnalysisError(f"--out {out} is a file (expected a directory for the results)")
    paths = {name: folder / name for name in names}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise AnalysisError(
            f"--out {out}: {existing[0].name} already exists (pass --overwrite to replace the "
            "results there, or choose another --out)"
        )
    return paths


def _replace_into(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    """``payload`` as indented JSON at ``path`` (via a temporary file and a rename)."""
    _replace_into(path, lambda temp: temp.write_text(json.dumps(payload, indent=2) + "\n"))


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` as PNG at ``path`` and close it."""
    plt = pyplot()
    try:
        _replace_into(path, lambda temp: fig.savefig(temp, dpi=120, format="png"))
    finally:
        plt.close(fig)
