"""Which kind of model a ``--model`` path holds, and opening it.

- a Hugging Face model directory: ``config.json`` naming a ``model_type``;
- one of our checkpoints: a folder with ``COMPLETE.json``, or a run directory with
  ``checkpoints/`` (its newest complete checkpoint is used).

Anything else, including a hub name that is not a local directory, is an error: nothing is
ever downloaded. Megatron-core is imported only for our checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mone_train.analysis.errors import AnalysisError

EXPECTED = (
    "expected a local Hugging Face model directory (config.json with model_type), a mone-train "
    "run directory (with checkpoints/) or checkpoint folder (with COMPLETE.json); "
    "nothing is downloaded"
)


def model_kind(path: Path) -> str:
    """``"huggingface"`` or ``"mone-train"`` for a model directory; AnalysisError otherwise."""
    if not path.is_dir():
        raise AnalysisError(f"--model {path} is not a model directory ({EXPECTED})")
    config = path / "config.json"
    if config.is_file():
        try:
            if "model_type" in json.loads(config.read_text()):
                return "huggingface"
        except (OSError, ValueError):
            pass
    if (path / "COMPLETE.json").is_file() or (path / "checkpoints").is_dir():
        return "mone-train"
    if (path / "metadata.json").is_file() and any(path.glob("*.distcp")):
        return "mone-train"  # a checkpoint whose save did not finish: reported when opened
    raise AnalysisError(f"--model {path} is not a model directory ({EXPECTED})")


def open_model(path: str, device: torch.device, dtype: str = "auto"):
    """The model at ``path`` with its routed experts hooked (an HFModel or an OurModel)."""
    folder = Path(path).expanduser()
    kind = model_kind(folder)
    if kind == "huggingface":
        from mone_train.analysis.hf_models import HFModel

        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        return HFModel(folder, device, dtype)
    if dtype not in ("auto", "float32"):
        raise AnalysisError(
            f"--dtype {dtype} is invalid for a mone-train checkpoint: expected auto or float32 "
            "(the trainer runs fp32 only)"
        )
    from mone_train.analysis.our_models import OurModel

    return OurModel(folder, device)
