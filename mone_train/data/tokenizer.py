"""Byte-level tokenizer: token i < 256 is byte i, then end-of-document and padding."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus ``eod`` (256) and ``pad`` (257).

    Carries the attributes megatron-core's GPTDataset reads (``vocab_size``, ``eod``, ``pad``,
    ``unique_identifiers``), so it can be passed to ``GPTDatasetConfig`` directly.
    """

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
