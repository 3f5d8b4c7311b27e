"""Tokenizers: text <-> token ids.

* ``ByteTokenizer``: the bundled model's. Token id = byte value (0..255) of the UTF-8 encoding, so
  there is nothing to download and nothing unknown. Decoding a stream byte by byte must not split a
  multi-byte character: ``StreamDecoder`` holds back incomplete UTF-8 sequences.
* ``HFTokenizer``: a thin wrapper over the ``tokenizers`` library for a checkpoint's ``tokenizer.json``.
"""

from __future__ import annotations

import codecs
import numbers
from pathlib import Path
from typing import Optional, Sequence

from .errors import BackendUnavailableError, InvalidInputError


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(_byte(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder()


def _byte(token) -> int:
    """A byte-level token id as a byte value, or InvalidInputError (never a silent int(3.7) == 3)."""
    value = int(token) if isinstance(token, numbers.Integral) and not isinstance(token, bool) else None
    if value is None or not 0 <= value < 256:
        raise InvalidInputError(f"token id {token!r} is not a byte: ByteTokenizer ids are integers 0..255")
    return value


class StreamDecoder:
    """Incremental byte-level decoding: feed one token id at a time, get the text completed so far."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(bytes([_byte(token)]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HFTokenizer:
    """A checkpoint's ``tokenizer.json`` through the ``tokenizers`` library (``pip install tokenizers``)."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError(
                "reading tokenizer.json needs the tokenizers package: pip install 'minikv[tokenizers]'"
            ) from None
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def stream_decoder(self) -> "_ReDecoder":
        return _ReDecoder(self)


class _ReDecoder:
    """Streams text from a subword tokenizer by decoding the whole output and emitting the new suffix
    (a token may change how its neighbours decode, so decoding tokens one by one is wrong)."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer, self._ids, self._emitted = tokenizer, [], ""

    def feed(self, token: int) -> str:
        self._ids.append(int(token))
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):      # an incomplete multi-byte character: wait for more
            return ""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        new, self._emitted = text[len(self._emitted):], text
        return new


def tokenizer_for(folder: Optional[Path], vocab_size: int):
    """The tokenizer of a checkpoint folder: its tokenizer.json, else bytes for a 256-token vocabulary."""
    if folder is not None and (Path(folder) / "tokenizer.json").exists():
        return HFTokenizer(Path(folder) / "tokenizer.json")
    if vocab_size == 256:
        return ByteTokenizer()
    return None


def require_tokenizer(tokenizer, what: str):
    if tokenizer is None:
        raise InvalidInputError(
            f"this model has no tokenizer (no tokenizer.json and a vocabulary of more than 256), so {what} "
            "needs token ids instead of text"
        )
    return tokenizer
