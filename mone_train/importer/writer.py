"""Write an imported model: a megatron-core checkpoint of its weights, its tokenizer, and the
config that trains it.

``--out DIR`` becomes (written into a staging folder beside it and renamed at the end, so an
interrupted import leaves nothing under the name):

    COMPLETE.json, *.distcp, ...   a weights-only ``dist_checkpointing`` checkpoint (step 0,
                                   the model's config and signature in the marker): mone-export,
                                   mone-analyze and trainer.init_from read it at any EP size
    tokenizer.json, ...            the source's tokenizer files, when it has them
    arch/imported.yaml             ``mone-train --config-dir DIR arch=imported``: the model
                                   section, the tokenizer and trainer.init_from=DIR
    import.json                    where it came from, and the command line that trains it

The weights are stored in the source's dtype (bf16 stays bf16; ``trainer.init_from`` and
mone-export read any dtype into their fp32 tensors). No GPTModel holds them: the model is built
on the meta device for its sharded state dict (names, shapes, sharding), the converted tensors
are put into it, one copy, and ``dist_checkpointing`` saves that. The free space of ``--out``'s
disk is checked against the bytes to write before anything is read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mone_train.components.checkpoint import (
    MARKER,
    model_signature,
    require_free_space,
    use_forked_results_queue,
)
from mone_train.components.checkpoint_model import weight_entries
from mone_train.config import Config, ModelConfig
from mone_train.importer.hf_source import TOKENIZER_FILES, HFSource, ImportError_

ARCH_FILE = Path("arch") / "imported.yaml"
PROVENANCE = "import.json"


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``--out`` unless ``overwrite``, and even then replace only an earlier
    import or an empty folder."""
    if not out.exists():
        if not out.parent.is_dir():
            raise ImportError_(f"--out {out}: the parent folder {out.parent} does not exist")
        return
    if not out.is_dir():
        raise ImportError_(f"--out {out} is an existing file (expected a folder to create)")
    if not overwrite:
        raise ImportError_(f"--out {out} already exists (pass --overwrite to replace it)")
    if any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise ImportError_(f"--out {out} is a non-empty folder that is not an earlier import (no "
                           f"{PROVENANCE}); refusing to replace it")  # fmt: skip


def imported_config(settings: dict, tokenizer: dict, out: Path) -> Config:
    """The Config of the imported model: its model section, plain MoE (the weights are), the
    tokenizer it came with."""
    cfg = Config()
    cfg.model = ModelConfig(**settings)
    cfg.moe.flavour = "moe"
    cfg.data.tokenizer.type = tokenizer["type"]
    cfg.data.tokenizer.path = tokenizer.get("path")
    cfg.data.tokenizer.eod_token = tokenizer.get("eod_token")
    cfg.trainer.expert_parallel_size = 1
    cfg.trainer.run_dir = str(out)  # a plain value (the default names the time of a run)
    cfg.validate()
    return cfg


def tokenizer_settings(source: HFSource, vocab_size: int, out: Path) -> dict:
    """``data.tokenizer`` for the copied tokenizer (the byte tokenizer without one), checked
    against the model's vocabulary."""
    from mone_train.data.tokenizer import HFTokenizer

    if source.tokenizer is None:
        if vocab_size < 258:
            raise ImportError_(f"{source.path}: no tokenizer.json, and a vocabulary of "
                               f"{vocab_size} is too small for the byte tokenizer")  # fmt: skip
        return {"type": "byte"}
    eod_token = None
    eos = getattr(source.config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(source.tokenizer))
    if eos is not None:
        eod_token = raw.id_to_token(int(eos))
    try:
        tokenizer = HFTokenizer(source.tokenizer, eod_token)
    except Exception as err:
        raise ImportError_(f"{source.tokenizer}: {err}") from None
    if tokenizer.vocab_size > vocab_size:
        raise ImportError_(
            f"{source.tokenizer}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary (config.json vocab_size) is {vocab_size}: not this model's tokenizer"
        )
    return {"type": "hf", "path": str(out / "tokenizer.json"), "eod_token": eod_token}


def write_import(
    source: HFSource, convert: Callable[[], dict], settings: dict, out: Path, provenance: dict
) -> Config:
    """Write the import: ``convert()`` gives the weights under megatron's names, and they go
    into the checkpoint as they are (no model is built around them: its layout comes from a
    GPTModel on the meta device), so the weights are held once, in their own dtype."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mone_train.model.builder import build_gpt_model
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed

    tokenizer = tokenizer_settings(source, settings["vocab_size"], out)
    cfg = imported_config(settings, tokenizer, out)
    staging = out.parent / f".{out.name}.import-tmp"
    own_group = not dist.is_initialized()
    try:
        init_distributed(1, device="cpu")
        sharded = build_gpt_model(cfg, settings["vocab_size"], meta=True).sharded_state_dict()
        itemsize = torch.tensor([], dtype=source.dtype).element_size()
        need = itemsize * sum(v.data.numel() for v in weight_entries(sharded).values())
        require_free_space(out.parent, need + _tokenizer_bytes(source), "--out")
        state = convert()
        provenance["parameters"] = parameters(state)
        _place(sharded, state, source.path)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        use_forked_results_queue()  # megatron's writer would spawn an interpreter otherwise
        dist_checkpointing.save({"model": sharded}, str(staging))
        del sharded
        _write_rest(source, cfg, staging, out, provenance)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if own_group:
            shutdown_distributed()
    return cfg


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger one (an expert of a stacked layer,
    gate and up of a fused projection), so the larger one is freed once its views are placed."""
    whole = tensor.is_contiguous() and (
        tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )
    return tensor if whole else tensor.clone()


def _place(sharded: dict, state: dict, where: Path) -> None:
    """Move the converted tensors of ``state`` (emptied) into the sharded state dict; the
    gated experts' factories (fc1 saved as gate and up) are built here, one at a time."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    weights = weight_entries(sharded)
    missing = [name for name in weights if name not in state]
    extra = [name for name in state if name not in weights]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an extra {extra[0]}"
        raise ImportError_(f"{where}: the converted weights do not fit the model ({what})")
    for name, value in weights.items():
        tensor = state.pop(name)
        if tensor.shape != value.data.shape:
            raise ImportError_(f"{where}: the converted {name} has shape {list(tensor.shape)}, "
                               f"the model's is {list(value.data.shape)}")  # fmt: skip
        value.data = _own_storage(tensor)
        del tensor
        if isinstance(value, ShardedTensor):
            value.dtype = value.data.dtype
            continue
        assert isinstance(value, ShardedTensorFactory)
        built = value.build()
        value.data = None
        for part in nested_values(built):
            part.data = _own_storage(part.data)
            part.dtype = part.data.dtype
        sharded[name] = built


def _tokenizer_bytes(source: HFSource) -> int:
    files = [source.path / name for name in TOKENIZER_FILES]
    return sum(file.stat().st_size for file in files if file.is_file())


def _write_rest(source: HFSource, cfg: Config, staging: Path, out: Path, provenance: dict):
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    marker = {
        "step": 0,
        "signature": model_signature(cfg, cfg.model.vocab_size),
        "world_size": 1,
        "config": resolved,
        "weights_only": True,
        "dtype": provenance.get("dtype"),
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=2))
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, staging / name)
    arch = {"model": resolved["model"], "data": {"tokenizer": resolved["data"]["tokenizer"]},
            "trainer": {"init_from": str(out)}}  # fmt: skip
    (staging / ARCH_FILE).parent.mkdir()
    (staging / ARCH_FILE).write_text(
        "# @package _global_\n# Written by mone-import: the imported model, its tokenizer, and its "
        f"weights as the start\n# of a new run: mone-train --config-dir {out} arch=imported ...\n"
        + OmegaConf.to_yaml(OmegaConf.create(arch))
    )
    command = f"mone-train --config-dir {out} arch=imported"
    (staging / PROVENANCE).write_text(json.dumps({**provenance, "train": command}, indent=2))


def parameters(state: dict) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
