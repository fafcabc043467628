"""Export a mone-train checkpoint as a Hugging Face model directory, or build the same model in
memory.

A directory written by :func:`export_checkpoint`:

    config.json              transformers config (``auto_map`` -> the files below for MoNE)
    generation_config.json   end-of-document / padding ids
    model.safetensors        the weights (converted by ``convert.py``; with ``--max-shard-size``
                             exceeded: model-0000i-of-0000n.safetensors + index, ``shards.py``)
    configuration_mone.py    MoNE architecture only: the modeling code, loaded with
    modeling_mone.py           ``trust_remote_code=True`` (torch + transformers, no megatron)
    sparse_decode.py           (a copy of ``mone_kernels/sparse_decode.py``)
    tokenizer.json, tokenizer_config.json, mone_tokenizer.json   (see ``tokenizer_files.py``)
    mone_export.json         where it came from: checkpoint, step, flavour, rho, K, config

Everything is written into a staging folder beside ``--out`` and renamed into place at the end,
so an interrupted export never leaves a half-written model under the requested name. The
export holds no whole model: megatron's and transformers' models exist on the meta device
only, and the weights are read, converted and written one group (a decoder layer) at a time;
the files are those ``save_pretrained`` would write. :func:`hf_model_from_checkpoint` builds
the whole transformers model in memory instead, for generation.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mone_train.components.checkpoint import require_free_space
from mone_train.components.checkpoint_model import load_weight_group
from mone_train.data.tokenizer import tokenizer_from_config
from mone_train.errors import ConfigError
from mone_train.export import remote_code
from mone_train.export.convert import (
    MONE,
    architecture_for,
    convert_partial,
    convert_state_dict,
    hf_config,
    num_kept,
)
from mone_train.export.errors import ExportError
from mone_train.export.megatron_source import (
    MegatronCheckpoint,
    describe_checkpoint,
    megatron_checkpoint,
    read_weights,
)
from mone_train.export.shards import ShardWriter, TensorSpec, plan_shards, size_in_bytes
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
    tokenizer = _tokenizer(loaded, key)
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
    source: Path,
    out: Path,
    overwrite: bool = False,
    dtype: str = "float32",
    max_shard_size: str = "5GB",
    with_mtp: bool = False,
) -> ExportResult:
    """Write the Hugging Face directory of ``source`` (run directory or checkpoint) to ``out``.

    Bounded memory: the model exists only on the meta device (megatron's and transformers');
    the weights are read one group at a time (the outer tensors, then each decoder layer),
    converted and written into their place in the planned shards. ``with_mtp``: the
    multi-token prediction layers too, as DeepSeek-V3's extra layers (transformers' class
    ignores them; speculative decoders read them); refused for our modeling code."""
    source, out = Path(source).expanduser(), Path(out).expanduser().absolute()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is invalid: expected one of {', '.join(DTYPES)}")
    max_shard_bytes = size_in_bytes(max_shard_size)
    check_output(out, overwrite)
    describe_checkpoint(source, key="source")  # a bad path fails before any loading
    with megatron_checkpoint(source, key="source", meta=True) as loaded:
        tokenizer = _tokenizer(loaded, key="source")
        arch = architecture_for(loaded.cfg)
        if with_mtp and not loaded.cfg.model.mtp_num_layers:
            raise ExportError(f"--with-mtp: {source} has no multi-token prediction layers "
                              "(model.mtp_num_layers=0)")  # fmt: skip
        if with_mtp and arch == MONE:
            raise ExportError(f"--with-mtp: {source} exports as our modeling code "
                              "(MoNEForCausalLM), which has no multi-token prediction layers; "
                              "export without --with-mtp")  # fmt: skip
        hf_model = _meta_hf_model(loaded, tokenizer, arch, with_mtp)
        groups = weight_groups(loaded.model, loaded.cfg, with_mtp)
        specs = [
            TensorSpec(name, tensor.dtype, tuple(tensor.shape))
            for group in groups
            for name, tensor in _hf_tensors(loaded, hf_model, _meta(group), dtype).items()
        ]
        require_free_space(out.parent, sum(spec.num_bytes for spec in specs) + 2**20, "--out")
        staging = out.parent / f".{out.name}.export-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            writer = ShardWriter(staging, plan_shards(specs, max_shard_bytes))
            for group in groups:
                state = load_weight_group(loaded.path, group, key="source")
                for name, tensor in _hf_tensors(loaded, hf_model, state, dtype).items():
                    writer.write(name, tensor)
                del state
            writer.finish()
            _write_rest(staging, hf_model, loaded, arch, dtype)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    cfg = loaded.cfg
    return ExportResult(
        out, loaded.path, loaded.step, arch, num_kept(cfg), cfg.model.moe_ffn_hidden_size
    )


def _tokenizer(loaded: MegatronCheckpoint, key: str):
    try:
        return tokenizer_from_config(getattr(loaded.cfg.data, "tokenizer", None))
    except ConfigError as err:
        raise ExportError(f"{key} {loaded.path}: {err}") from None


def _meta_hf_model(loaded: MegatronCheckpoint, tokenizer, arch: str, with_mtp: bool = False):
    """The Hugging Face model on the meta device: its config, generation config and weight
    conversions (what ``save_pretrained`` reads of a model), no weights."""
    special = {"eos": int(tokenizer.eod), "pad": int(tokenizer.pad), "bos": None}
    config = hf_config(loaded.cfg, loaded.vocab_size, special, arch)
    if hasattr(config, "num_nextn_predict_layers"):  # DeepSeek-V3's count of its MTP layers
        config.num_nextn_predict_layers = loaded.cfg.model.mtp_num_layers if with_mtp else 0
    with torch.device("meta"):
        return _model_class(arch)(config)


def weight_groups(model: torch.nn.Module, cfg, with_mtp: bool = False) -> list[dict]:
    """The model's sharded state dict (megatron's names -> sharded tensors) in the groups the
    export reads at a time: the tensors outside the decoder layers, then each layer; with
    ``with_mtp`` each multi-token prediction layer after them, with the embedding and output
    layer (which DeepSeek-V3's layout copies into it), else none of them."""
    from mone_train.components.checkpoint_model import weight_entries

    layer = re.compile(r"decoder\.layers\.(\d+)\.")
    mtp = re.compile(r"mtp\.layers\.(\d+)\.")
    groups: dict[int, dict] = {}
    entries = weight_entries(model.sharded_state_dict())
    for name, value in entries.items():
        if name == "output_layer.weight" and cfg.model.tie_embeddings:
            continue  # the embedding again
        if (match := mtp.match(name)) is not None:
            if not with_mtp:
                continue
            index = cfg.model.num_layers + int(match.group(1))
            group = groups.setdefault(index, {})
            for outer in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if outer in entries and not (outer == "output_layer.weight"
                                             and cfg.model.tie_embeddings):  # fmt: skip
                    group[outer] = entries[outer]
            group[name] = value
            continue
        match = layer.match(name)
        groups.setdefault(int(match.group(1)) if match else -1, {})[name] = value
    return [groups[i] for i in sorted(groups)]


def _meta(group: dict) -> dict[str, torch.Tensor]:
    return {name: value.data for name, value in group.items()}


def _hf_tensors(loaded: MegatronCheckpoint, hf_model, state: dict, dtype: str) -> dict:
    """A group of megatron tensors -> the tensors ``save_pretrained`` would write for them:
    Hugging Face names, the class's on-disk layout (its reverted weight conversions), ``dtype``."""
    from transformers.core_model_loading import revert_weight_conversion

    converted = convert_partial(loaded.cfg, state, architecture_for(loaded.cfg))
    reverted = revert_weight_conversion(hf_model, converted)
    return {name: tensor.to(DTYPES[dtype]) for name, tensor in reverted.items()}


def _write_rest(staging: Path, hf_model, loaded: MegatronCheckpoint, arch: str, dtype: str):
    """config.json and generation_config.json as ``save_pretrained`` writes them, the modeling
    code (MoNE), the tokenizer files and the provenance."""
    config = hf_model.config
    config.dtype = dtype
    config.architectures = [type(hf_model).__name__]
    if arch == MONE:
        config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(staging)
    if hf_model.can_generate():
        hf_model.generation_config.save_pretrained(staging)
    if arch == MONE:
        _write_code(staging)
    tokenizer_cfg = getattr(loaded.cfg.data, "tokenizer", None)
    write_tokenizer_files(tokenizer_cfg, staging, loaded.cfg.model.max_position_embeddings)
    provenance = _provenance(hf_model, loaded, dtype)
    (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
