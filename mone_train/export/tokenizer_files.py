"""The tokenizer files of an exported model directory, and reading them back.

Every export writes ``mone_tokenizer.json`` (kind, file, end-of-document and padding ids), which
``mone-generate`` reads to rebuild the run's own tokenizer. Beside it:

- ``byte``: a ``tokenizer.json`` that tokenizes exactly like the byte tokenizer (UTF-8 bytes ->
  ids 0-255 through a byte-level pre-tokenizer and a merge-free BPE, ``<|endoftext|>`` = 256,
  ``<pad>`` = 257) and a ``tokenizer_config.json``, so ``AutoTokenizer`` and evaluation
  harnesses load it too;
- ``hf``: the run's ``tokenizer.json`` copied, with a ``tokenizer_config.json``;
- ``sentencepiece``: the ``.model`` file copied as ``tokenizer.model`` (for ``mone-generate``;
  ``AutoTokenizer`` is not configured for it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mone_train.data.tokenizer import ByteTokenizer, build_tokenizer
from mone_train.errors import ConfigError
from mone_train.export.errors import ExportError

DESCRIPTION = "mone_tokenizer.json"
BYTE_EOD_TOKEN = "<|endoftext|>"
BYTE_PAD_TOKEN = "<pad>"


def _byte_symbols() -> list[str]:
    """The byte-level pre-tokenizer's printable symbol of each byte 0-255 (GPT-2's table)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def byte_tokenizer_json():
    """A ``tokenizers.Tokenizer`` whose ids equal :class:`ByteTokenizer`'s."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(BYTE_EOD_TOKEN, special=True), AddedToken(BYTE_PAD_TOKEN, special=True)]
    )
    byte = ByteTokenizer()
    assert tokenizer.token_to_id(BYTE_EOD_TOKEN) == byte.eod
    assert tokenizer.token_to_id(BYTE_PAD_TOKEN) == byte.pad
    return tokenizer


def _tokenizer_config(eos: str, pad: str, max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer_files(tokenizer_cfg, out: Path, max_length: int) -> dict:
    """Write the tokenizer of a run (its ``data.tokenizer`` node, None for bytes) into ``out``;
    return the description written to ``mone_tokenizer.json``."""
    kind = getattr(tokenizer_cfg, "type", "byte") if tokenizer_cfg is not None else "byte"
    if kind == "byte":
        byte_tokenizer_json().save(str(out / "tokenizer.json"))
        config = _tokenizer_config(BYTE_EOD_TOKEN, BYTE_PAD_TOKEN, max_length)
        byte = ByteTokenizer()
        description = {"kind": "byte", "file": "tokenizer.json", "eod": byte.eod, "pad": byte.pad}
    else:
        try:
            ours = build_tokenizer(
                kind, tokenizer_cfg.path, getattr(tokenizer_cfg, "eod_token", None)
            )
        except ConfigError as err:  # TokenizerError names the file
            raise ExportError(f"the run's tokenizer cannot be read: {err}") from None
        name = "tokenizer.json" if kind == "hf" else "tokenizer.model"
        shutil.copyfile(ours.path, out / name)
        description = {"kind": kind, "file": name, "eod": ours.eod, "pad": ours.pad}
        config = None
        if kind == "hf":
            from tokenizers import Tokenizer

            tokens = Tokenizer.from_file(str(ours.path))
            description["eod_token"] = tokens.id_to_token(ours.eod)
            pad = tokens.id_to_token(ours.pad)
            config = _tokenizer_config(description["eod_token"], pad, max_length)
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    return description


def load_exported_tokenizer(model_dir: Path):
    """The tokenizer of an exported directory (one of ``mone_train.data.tokenizer``'s kinds).

    Directories without ``mone_tokenizer.json`` but with a ``tokenizer.json`` (other Hugging
    Face models) get that file as an ``hf`` tokenizer.
    """
    model_dir = Path(model_dir)
    described = model_dir / DESCRIPTION
    if not described.is_file():
        if (model_dir / "tokenizer.json").is_file():
            return build_tokenizer("hf", str(model_dir / "tokenizer.json"))
        raise ExportError(f"{model_dir}: no {DESCRIPTION} and no tokenizer.json")
    try:
        description = json.loads(described.read_text())
        kind, file = description["kind"], model_dir / description["file"]
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{described}: unreadable tokenizer description ({err})") from None
    if kind == "byte":
        return ByteTokenizer()
    return build_tokenizer(kind, str(file), description.get("eod_token"))
