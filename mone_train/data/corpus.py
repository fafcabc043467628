"""The default corpus: this interpreter's standard-library ``.py`` sources.

Byte-tokenized by default, or with any tokenizer of ``mone_train.data.tokenizer`` (e.g. a BPE
vocabulary from ``mone-tokenizer train --stdlib``); each tokenizer gets its own cache entry.
About 30 MB of real text on any machine with Python, so ``make train`` needs no download.
Documents are the files in sorted path order (site-packages excluded); every ``valid_every``-th
document is held out for validation. Both splits are written with megatron-core's indexed
dataset builder into ``<cache_dir>/corpus/<name>/{train,valid}.{bin,idx}``, built once: the
directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from mone_train.data.tokenizer import ByteTokenizer

MANIFEST = "manifest.json"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Path prefixes (without .bin/.idx) of the two splits and the build summary."""

    train_prefix: str
    valid_prefix: str
    manifest: dict


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def corpus_name(valid_every: int, tokenizer=None) -> str:
    """Cache folder name: the interpreter's version decides the text, valid_every the split,
    the tokenizer (kind and fingerprint; none for bytes) the tokens."""
    version = ".".join(str(v) for v in sys.version_info[:3])
    if tokenizer is None or tokenizer.kind == "byte":
        tokens = "bytes"
    else:
        tokens = f"{tokenizer.kind}-{tokenizer.fingerprint}"
    return f"stdlib-py{version}-{tokens}-valid{valid_every}"


def prepare_stdlib_corpus(
    cache_dir: str | os.PathLike, valid_every: int = 50, tokenizer=None
) -> Corpus:
    """Return the cached corpus, building it first if it is missing or incomplete.

    ``tokenizer`` (default: bytes) is any tokenizer of ``mone_train.data.tokenizer``.
    """
    tokenizer = tokenizer or ByteTokenizer()
    target = Path(cache_dir).expanduser() / "corpus" / corpus_name(valid_every, tokenizer)
    manifest_path = target / MANIFEST
    if manifest_path.is_file():
        return _corpus_at(target, json.loads(manifest_path.read_text()))

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        manifest = _write_splits(staging, stdlib_sources(), valid_every, tokenizer)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists() and not manifest_path.is_file():
            shutil.rmtree(target)  # an incomplete cache entry (no manifest): ours to replace
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same build first; its result is identical.
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _corpus_at(target, json.loads(manifest_path.read_text()))


def _corpus_at(folder: Path, manifest: dict) -> Corpus:
    return Corpus(str(folder / "train"), str(folder / "valid"), manifest)


def _write_splits(folder: Path, sources: list[Path], valid_every: int, tokenizer) -> dict:
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builders = {
        split: IndexedDatasetBuilder(str(folder / f"{split}.bin"), dtype=dtype)
        for split in ("train", "valid")
    }
    stats = {split: {"documents": 0, "tokens": 0} for split in builders}
    for i, path in enumerate(tqdm(sources, desc="building stdlib corpus", unit="file")):
        raw = path.read_bytes()
        if not raw:
            continue
        split = "valid" if i % valid_every == valid_every - 1 else "train"
        # Bytes go in as they are; other tokenizers read text (invalid UTF-8 replaced).
        text = raw if tokenizer.kind == "byte" else raw.decode("utf-8", errors="replace")
        tokens = np.append(tokenizer.tokenize(text), tokenizer.eod).astype(dtype)
        builders[split].add_document(tokens, [len(tokens)])
        stats[split]["documents"] += 1
        stats[split]["tokens"] += len(tokens)
    for split, builder in builders.items():
        builder.finalize(str(folder / f"{split}.idx"))
    return {
        "source": str(Path(sysconfig.get_paths()["stdlib"])),
        "python": sys.version.split()[0],
        "tokenizer": tokenizer.describe(),
        "valid_every": valid_every,
        "splits": stats,
    }
