"""A local Hugging Face model directory, read without transformers' model classes.

Reads ``config.json`` (through transformers' config class of its ``model_type``, offline, so
that defaults are the class's own), the safetensors weights (one file, or shards listed in
``model.safetensors.index.json``), and finds the tokenizer files. Weights are read lazily, one
tensor at a time, in the checkpoint's own dtype (or the one asked for): nothing else of the
model is held. Every file's header is checked against its size first, so that a truncated
download fails before any work. Nothing is ever downloaded: the path must be a local folder.

Expert weights come in either layout transformers writes: one tensor per expert (what
``save_pretrained`` writes, and released checkpoints: ``mlp.experts.<e>.gate_proj`` /
``up_proj`` / ``down_proj``, Mixtral's ``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``) or
the fused in-memory tensors (``mlp.experts.gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]).

FP8 block-scaled weights (DeepSeek-V3's release: ``float8_e4m3fn`` weights, each with a
``weight_scale_inv`` of one fp32 scale per 128 x 128 block, ``quantization_config.
weight_block_size``) are dequantised as they are read, one tensor at a time: each block times
its scale (what DeepSeek's ``fp8_cast_bf16.py`` does), then the dtype asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mone_train.errors import ConfigError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
)  # fmt: skip


class ImportError_(ConfigError):
    """A bad import input; the message names the file or key and what would be valid."""


@dataclass
class HFSource:
    """A model directory: its config object, where each tensor lives, its tokenizer files."""

    path: Path
    config: object  # transformers PretrainedConfig of the model_type
    model_type: str
    tokenizer: Path | None = None  # tokenizer.json, when there is one
    dtype: torch.dtype | None = None  # what tensor() returns; None: the stored dtype
    _files: dict[str, Path] | None = field(default=None, repr=False)

    @property
    def files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it (read on first use, so that an
        unsupported architecture is reported before missing weights)."""
        if self._files is None:
            self._files = _weight_files(self.path)
        return self._files

    def has(self, name: str) -> bool:
        return name in self.files

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its weights in (its embedding's)."""
        name = "model.embed_tokens.weight"
        if name not in self.files:
            raise ImportError_(f"{self.path}: the weights lack {name!r}")
        code = safetensors_header(self.files[name])[name]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise ImportError_(f"{self.files[name]}: {name} is stored as {code} (expected one "
                               f"of {', '.join(SAFETENSORS_DTYPES)})")  # fmt: skip
        return SAFETENSORS_DTYPES[code]

    @property
    def num_bytes(self) -> int:
        """Bytes of the weight files (headers included)."""
        return sum(file.stat().st_size for file in set(self.files.values()))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read now, in ``dtype`` (raises ImportError_ naming it when absent). The
        file is opened per tensor, so no shard stays mapped into memory."""
        from safetensors import safe_open

        if name not in self.files:
            raise ImportError_(f"{self.path}: the weights lack {name!r}")
        with safe_open(str(self.files[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        if tensor.dtype in FP8_DTYPES:
            tensor = self._dequantised(name, tensor)
        return tensor if self.dtype in (None, tensor.dtype) else tensor.to(self.dtype)

    def _dequantised(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """An FP8 weight [rows, cols] times its ``weight_scale_inv`` [ceil(rows / b0),
        ceil(cols / b1)], one scale per b0 x b1 block, in fp32."""
        from safetensors import safe_open

        scale_name = f"{name}_scale_inv"
        if scale_name not in self.files:
            raise ImportError_(f"{self.path}: {name} is stored as {weight.dtype} without a "
                               f"{scale_name!r} beside it (FP8 weights need their block "
                               "scales)")  # fmt: skip
        with safe_open(str(self.files[scale_name]), framework="pt") as f:
            scale = f.get_tensor(scale_name).float()
        rows, cols = weight.shape
        b0, b1 = self.block_size
        if scale.shape != ((rows + b0 - 1) // b0, (cols + b1 - 1) // b1):
            raise ImportError_(f"{self.path}: {scale_name} has shape {list(scale.shape)}, not one "
                               f"scale per {b0}x{b1} block of {name}'s {[rows, cols]}")  # fmt: skip
        dequantised = weight.float()  # scaled in place, a block row at a time: no second copy
        per_column = scale.repeat_interleave(b1, dim=1)[:, :cols]
        for block_row, row_scales in zip(dequantised.split(b0), per_column):
            block_row.mul_(row_scales)
        return dequantised

    @property
    def block_size(self) -> tuple[int, int]:
        """The FP8 weights' scaling block (``quantization_config.weight_block_size``)."""
        quant = getattr(self.config, "quantization_config", None) or {}
        if not isinstance(quant, dict):
            quant = quant.to_dict()
        rows, cols = quant.get("weight_block_size") or (128, 128)
        return int(rows), int(cols)

    def experts(self, prefix: str, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, 2F, D] gate|up, [E, D, F] down) of the MoE block under ``prefix`` (e.g.
        ``model.layers.3.mlp.``), from fused or per-expert tensors."""
        if self.has(f"{prefix}experts.gate_up_proj"):
            return (self.tensor(f"{prefix}experts.gate_up_proj"),
                    self.tensor(f"{prefix}experts.down_proj"))  # fmt: skip
        names = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
        for gate, up, down in names:
            if self.has(f"{prefix}experts.0.{gate}.weight"):
                fc1 = [
                    torch.cat(
                        [
                            self.tensor(f"{prefix}experts.{e}.{gate}.weight"),
                            self.tensor(f"{prefix}experts.{e}.{up}.weight"),
                        ]
                    )  # fmt: skip
                    for e in range(num_experts)
                ]
                fc2 = [
                    self.tensor(f"{prefix}experts.{e}.{down}.weight") for e in range(num_experts)
                ]
                return torch.stack(fc1), torch.stack(fc2)
        raise ImportError_(f"{self.path}: no expert weights under {prefix!r}")


def read_hf_dir(path: Path) -> HFSource:
    """The model directory at ``path``, or ImportError_ naming what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ImportError_(f"{path}: no such directory (expected a local Hugging Face model "
                           "folder; nothing is downloaded)")  # fmt: skip
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ImportError_(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as err:
        raise ImportError_(f"{config_file}: not JSON ({err})") from None
    model_type = raw.get("model_type")
    config = _config_object(config_file, raw, model_type)
    tokenizer = path / "tokenizer.json"
    return HFSource(path, config, model_type, tokenizer if tokenizer.is_file() else None)


def _config_object(config_file: Path, raw: dict, model_type: str | None):
    from transformers import AutoConfig

    if not model_type:
        raise ImportError_(f"{config_file}: no model_type (expected a transformers config)")
    try:
        return AutoConfig.for_model(**raw)
    except (KeyError, ValueError) as err:
        raise ImportError_(
            f"{config_file}: model_type {model_type!r} is unknown to transformers ({err})"
        ) from None


# safetensors' dtype codes of the weights we read
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # block-scaled: dequantised when read


def safetensors_header(file: Path) -> dict:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets), checked
    against the file's size; ImportError_ naming the file when it is not one or is cut short."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        start = f.read(8)
        length = int.from_bytes(start, "little") if len(start) == 8 else size
        if 8 + length > size:
            raise ImportError_(f"{file}: truncated or not a safetensors file ({size:,} bytes, "
                               "shorter than its header): copy it again")  # fmt: skip
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise ImportError_(f"{file}: not a safetensors file ({err})") from None
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = 8 + length + max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if end > size:
        raise ImportError_(f"{file}: truncated ({size:,} bytes; its header describes {end:,}): "
                           "copy it again")  # fmt: skip
    return tensors


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (every file's header checked)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ImportError_(f"{index}: not a safetensors index ({err})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ImportError_(
                f"{path}: shard {missing[0]} listed in {index.name} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        for file in sorted(set(weight_map.values())):
            names = safetensors_header(path / file)
            absent = [
                name for name, held in weight_map.items() if held == file and name not in names
            ]
            if absent:
                raise ImportError_(f"{path / file} lacks {absent[0]!r}, which {index.name} places "
                                   "there")  # fmt: skip
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        found = sorted(p.name for p in path.glob("*.bin")) or ["nothing"]
        raise ImportError_(
            f"{path}: no model.safetensors or model.safetensors.index.json (found "
            f"{', '.join(found[:3])}; only safetensors weights are read)"
        )
    return {name: single for name in safetensors_header(single)}
