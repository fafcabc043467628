"""Sharded safetensors written one tensor at a time, the way ``save_pretrained`` lays them out.

Every tensor's name, dtype and shape is known before any is read (the export converts the
model on the meta device first), so each shard's header is written up front and each tensor
goes straight to its place in its file as it is produced: nothing is buffered beyond the
tensor itself. The files are what ``safetensors.torch.save_file`` writes (a little-endian
header length, the JSON header padded with spaces to 8 bytes, the tensors back to back) and,
for more than one shard, ``model.safetensors.index.json`` as transformers writes it; a
single shard is ``model.safetensors``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mone_train.export.errors import ExportError

SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def size_in_bytes(text: str, key: str = "--max-shard-size") -> int:
    """``"5GB"`` -> 5 * 10**9 (transformers' units: KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None or float(match.group(1)) <= 0:
        raise ExportError(f"{key} {text!r} is not a size (expected e.g. 5GB, 500MB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the export: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.tensor([], dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """The tensors in order, cut into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own, as in transformers)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.num_bytes
    return shards


class ShardWriter:
    """Writes planned shards into ``folder``: headers now, each tensor when :meth:`write`
    gets it (in any order), the index in :meth:`finish`."""

    def __init__(self, folder: Path, shards: list[list[TensorSpec]]) -> None:
        self.folder = folder
        self.place: dict[str, tuple[Path, int, TensorSpec]] = {}
        self.weight_map: dict[str, str] = {}
        count = len(shards)
        for number, shard in enumerate(shards, start=1):
            name = "model.safetensors" if count == 1 else (
                f"model-{number:05d}-of-{count:05d}.safetensors")  # fmt: skip
            self._start_file(folder / name, shard)
        self.written: set[str] = set()

    def _start_file(self, file: Path, shard: list[TensorSpec]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in shard:
            header[spec.name] = {
                "dtype": SAFETENSORS_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.num_bytes],
            }
            offset += spec.num_bytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + len(text)
        with open(file, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            f.truncate(start + offset)
        for spec in shard:
            self.place[spec.name] = (file, start + header[spec.name]["data_offsets"][0], spec)
            self.weight_map[spec.name] = file.name

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` (the planned dtype and shape) into its file."""
        if name not in self.place:
            raise ExportError(f"tensor {name!r} was not planned for the export")
        file, offset, spec = self.place[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ExportError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned as "
                f"{spec.dtype} {list(spec.shape)}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(file, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.written.add(name)

    def finish(self) -> None:
        """Check every planned tensor was written; write the index of a sharded export."""
        missing = [name for name in self.place if name not in self.written]
        if missing:
            raise ExportError(f"tensor {missing[0]!r} was planned but never written")
        if len(set(self.weight_map.values())) == 1:
            return
        specs = [spec for _, _, spec in self.place.values()]
        index = {
            "metadata": {
                "total_parameters": sum(s.num_bytes // s.dtype.itemsize for s in specs),
                "total_size": sum(s.num_bytes for s in specs),
            },
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
