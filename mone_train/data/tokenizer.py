"""Tokenizers, all read from local files: byte-level, Hugging Face ``tokenizer.json``, SentencePiece.

Every kind carries the attributes megatron-core's GPTDataset reads (``vocab_size``, ``eod``,
``pad``, ``unique_identifiers``), so an instance can be passed to ``GPTDatasetConfig`` directly,
and the same three methods: ``tokenize(text) -> np.ndarray`` (no end-of-document appended),
``detokenize(ids) -> str`` and ``describe() -> dict`` (what a preprocessed dataset records, so a
run can check it reads data made with its own tokenizer).

``build_tokenizer(kind, path)`` is the one constructor; a missing or unreadable file is a
``TokenizerError`` whose message names the file.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mone_train.config import TOKENIZER_KINDS as KINDS
from mone_train.errors import ConfigError

# End-of-document tokens looked for (in this order) when a tokenizer file names none explicitly.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class TokenizerError(ConfigError):
    """A tokenizer that cannot be built; the message names the file or key."""


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class _Tokenizer:
    kind = "base"
    vocab_size: int
    eod: int
    pad: int

    def describe(self) -> dict:
        """Identity of the tokenizer, recorded beside preprocessed data and in run configs."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
            **self._identity(),
        }

    def _identity(self) -> dict:
        return {}

    @property
    def fingerprint(self) -> str:
        """Short hash of ``describe()``: equal fingerprints tokenize identically."""
        text = repr(sorted(self.describe().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.tokenize(t) for t in texts]


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes as tokens, plus ``eod`` (256) and ``pad`` (257)."""

    kind = "byte"
    eod = 256
    pad = 257
    vocab_size = 258

    def __init__(self) -> None:
        self.unique_identifiers = OrderedDict(class_name=type(self).__name__)

    def tokenize(self, text: str | bytes) -> np.ndarray:
        """Token ids (uint16) of ``text``, without end-of-document."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def detokenize(self, ids) -> str:
        """Text of byte tokens; special tokens are dropped, invalid UTF-8 replaced."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``, or a directory holding one)."""

    kind = "hf"

    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"tokenizer file {file} does not exist (expected a tokenizer.json or its folder)"
            )
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises its own Exception types
            raise TokenizerError(
                f"tokenizer file {file} is not a Hugging Face tokenizer.json ({str(err)[:200]})"
            ) from None
        self.path = file
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # The largest id + 1, not the count: ids may have gaps (the embedding must cover them).
        self.vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1
        )
        self.eod = _special_id(vocab, eod_token, EOD_CANDIDATES, file, "end-of-document")
        pad = _special_id(vocab, None, PAD_CANDIDATES, file, "padding", required=False)
        self.pad = self.eod if pad is None else pad
        self._digest = _file_digest(file)
        self.unique_identifiers = OrderedDict(class_name="HFTokenizer", sha256=self._digest)

    def _identity(self) -> dict:
        return {"sha256": self._digest}

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece ``.model`` file; its ``eos`` piece ends documents."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        file = Path(path).expanduser()
        if not file.is_file():
            raise TokenizerError(f"tokenizer file {file} does not exist (expected a .model file)")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except Exception as err:
            raise TokenizerError(
                f"tokenizer file {file} is not a SentencePiece model ({str(err)[:200]})"
            ) from None
        self.path = file
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod = int(self._sp.eos_id())
        if self.eod < 0:
            raise TokenizerError(
                f"tokenizer file {file} has no end-of-sentence piece (train it with eos_id >= 0)"
            )
        pad = int(self._sp.pad_id())
        self.pad = pad if pad >= 0 else self.eod
        self._digest = _file_digest(file)
        self.unique_identifiers = OrderedDict(
            class_name="SentencePieceTokenizer", sha256=self._digest
        )

    def _identity(self) -> dict:
        return {"sha256": self._digest}

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def tokenize_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self._sp.encode(texts)]

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def _special_id(vocab, explicit, candidates, file, what, required=True):
    if explicit is not None:
        if explicit not in vocab:
            raise TokenizerError(
                f"data.tokenizer.eod_token={explicit!r} is not in the vocabulary of {file}"
            )
        return int(vocab[explicit])
    for token in candidates:
        if token in vocab:
            return int(vocab[token])
    if required:
        raise TokenizerError(
            f"tokenizer file {file} has no {what} token (looked for {', '.join(candidates)}); "
            "name one with data.tokenizer.eod_token"
        )
    return None


def build_tokenizer(kind: str = "byte", path: str | None = None, eod_token: str | None = None):
    """The tokenizer of ``kind`` (one of ``KINDS``) read from ``path`` (not used for ``byte``)."""
    if kind not in KINDS:
        raise TokenizerError(f"data.tokenizer.type={kind!r} is not one of {', '.join(KINDS)}")
    if kind == "byte":
        return ByteTokenizer()
    if not path:
        raise TokenizerError(f"data.tokenizer.type={kind} needs data.tokenizer.path (a local file)")
    if kind == "hf":
        return HFTokenizer(path, eod_token)
    if eod_token is not None:
        raise TokenizerError(
            f"an end-of-document token ({eod_token!r}) can only be named for hf tokenizers; "
            "a SentencePiece model ends documents with its eos piece"
        )
    return SentencePieceTokenizer(path)


def tokenizer_from_config(tokenizer_cfg) -> _Tokenizer:
    """``build_tokenizer`` from a ``data.tokenizer`` config node (or None for bytes)."""
    if tokenizer_cfg is None:
        return ByteTokenizer()
    return build_tokenizer(
        tokenizer_cfg.type, tokenizer_cfg.path, getattr(tokenizer_cfg, "eod_token", None)
    )
