"""Export a mone-train checkpoint as a Hugging Face model directory, or build the same model in
memory.

A directory written by :func:`export_checkpoint`:

    config.json              transformers config (``auto_map`` -> the files below for MoNE)
    generation_config.json   end-of-document / padding ids
    model.safetensors        the weights (converted by ``convert.py``)
    configuration_mone.py    MoNE architecture only: the modeling code, loaded with
    modeling_mone.py           ``trust_remote_code=True`` (torch + transformers, no megatron)
    sparse_decode.py           (a copy of ``mone_kernels/sparse_decode.py``)
    tokenizer.json, tokenizer_config.json, mone_tokenizer.json   (see ``tokenizer_files.py``)
    mone_export.json         where it came from: checkpoint, step, flavour, rho, K, config

Everything is written into a staging folder beside ``--out`` and renamed into place at the end,
so an interrupted export never leaves a half-written model under the requested name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mone_train.data.tokenizer import tokenizer_from_config
from mone_train.errors import ConfigError
from mone_train.export import remote_code
from mone_train.export.convert import (
    MONE,
    architecture_for,
    convert_state_dict,
    hf_config,
    num_kept,
)
from mone_train.export.errors import ExportError
from mone_train.export.megatron_source import MegatronCheckpoint, describe_checkpoint, read_weights
from mone_train.export.tokenizer_files import write_tokenizer_files

PROVENANCE = "mone_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_MAP = {
    "AutoConfig": "configuration_mone.MoNEConfig",
    "AutoModelForCausalLM": "modeling_mone.MoNEForCausalLM",
}


@dataclass
class ExportResult:
    """What an export wrote."""

    out: Path
    checkpoint: Path
    step: int | None
    architecture: str
    num_kept_neurons: int
    num_neurons: int


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``--out`` unless ``overwrite``, and even then replace only an empty
    folder or an earlier export (never some other folder or a file)."""
    if not out.exists():
        if not out.parent.is_dir():
            raise ExportError(f"--out {out}: the parent folder {out.parent} does not exist")
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is an existing file (expected a folder to create)")
    if not overwrite:
        raise ExportError(f"--out {out} already exists (pass --overwrite to replace it)")
    if any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise ExportError(
            f"--out {out} is a non-empty folder that is not an earlier export (no {PROVENANCE}); "
            "refusing to replace it"
        )


def _model_class(arch: str):
    if arch != MONE:
        import transformers

        from mone_train.families import load_family

        return getattr(transformers, load_family(arch).hf_class)
    from mone_train.export.remote_code.modeling_mone import MoNEForCausalLM

    return MoNEForCausalLM


def build_hf_model(loaded: MegatronCheckpoint, state: dict, tokenizer, dtype: torch.dtype):
    """The Hugging Face model (eval mode) holding the checkpoint's converted weights."""
    cfg = loaded.cfg
    arch = architecture_for(cfg)
    special = {"eos": int(tokenizer.eod), "pad": int(tokenizer.pad), "bos": None}
    config = hf_config(cfg, loaded.vocab_size, special, arch)
    weights = convert_state_dict(cfg, state, arch)
    if cfg.model.tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model = _model_class(arch)(config)
    model.load_state_dict(weights, strict=True)
    if cfg.model.tie_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def hf_model_from_checkpoint(path: Path, dtype: torch.dtype = torch.float32, key: str = "model"):
    """(Hugging Face model, the run's tokenizer, checkpoint) for a run directory or checkpoint,
    converted in memory; the same model an export would write."""
    loaded, state = read_weights(Path(path), key)
    try:
        tokenizer = tokenizer_from_config(getattr(loaded.cfg.data, "tokenizer", None))
    except ConfigError as err:
        raise ExportError(f"{key} {loaded.path}: {err}") from None
    return build_hf_model(loaded, state, tokenizer, dtype), tokenizer, loaded


def _write_code(out: Path) -> None:
    package = Path(remote_code.__file__).parent
    for name in ("configuration_mone.py", "modeling_mone.py"):
        shutil.copyfile(package / name, out / name)
    import mone_kernels.sparse_decode as kernel

    shutil.copyfile(kernel.__file__, out / "sparse_decode.py")


def _provenance(model, loaded: MegatronCheckpoint, dtype: str) -> dict:
    cfg = loaded.cfg
    return {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "architecture": type(model).__name__,
        "flavour": cfg.moe.flavour,
        "neuron_keep_ratio": cfg.moe.neuron_keep_ratio if cfg.moe.flavour == "mone" else 1.0,
        "num_kept_neurons": num_kept(cfg),
        "num_neurons": cfg.model.moe_ffn_hidden_size,
        "dtype": dtype,
        "model": dict(vars(cfg.model)),
        "moe": dict(vars(cfg.moe)),
    }


def export_checkpoint(
    source: Path, out: Path, overwrite: bool = False, dtype: str = "float32"
) -> ExportResult:
    """Write the Hugging Face directory of ``source`` (run directory or checkpoint) to ``out``."""
    source, out = Path(source).expanduser(), Path(out).expanduser().absolute()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is invalid: expected one of {', '.join(DTYPES)}")
    check_output(out, overwrite)
    describe_checkpoint(source, key="source")  # a bad path fails before any loading
    model, tokenizer, loaded = hf_model_from_checkpoint(source, DTYPES[dtype], key="source")
    staging = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        arch = architecture_for(loaded.cfg)
        if arch == MONE:
            model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(staging)
        if arch == MONE:
            _write_code(staging)
        tokenizer_cfg = getattr(loaded.cfg.data, "tokenizer", None)
        write_tokenizer_files(tokenizer_cfg, staging, loaded.cfg.model.max_position_embeddings)
        provenance = _provenance(model, loaded, dtype)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cfg = loaded.cfg
    return ExportResult(
        out, loaded.path, loaded.step, arch, num_kept(cfg), cfg.model.moe_ffn_hidden_size
    )
