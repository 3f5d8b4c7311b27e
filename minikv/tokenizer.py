"""Tokenizers: text <-> token ids.

* ``ByteTokenizer``: the bundled model's. Token id = byte value (0..255) of the UTF-8 encoding, so
  there is nothing to download and nothing unknown. Decoding a stream byte by byte must not split a
  multi-byte character: ``StreamDecoder`` holds back incomplete UTF-8 sequences.
* ``HFTokenizer``: a checkpoint's ``tokenizer.json`` (+ ``tokenizer_config.json``, chat template) through
  the ``tokenizers`` library, adding special tokens exactly as transformers' ``AutoTokenizer`` does.
"""

from __future__ import annotations

import codecs
import json
import numbers
from pathlib import Path
from typing import Optional, Sequence

from .errors import BackendUnavailableError, CheckpointError, InvalidInputError, TokenizerError
from .validate import JSON_MAX_BYTES, TOKENIZER_MAX_BYTES, read_bytes, token_ids


class ByteTokenizer:
    vocab_size = 256
    special_tokens: dict[str, str] = {}
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:   # no special tokens exist
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
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


# The files a checkpoint's tokenizer is read from (and written back by Transformer.save).
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"   # written by transformers 4.x; read for the token names
CHAT_TEMPLATE_FILE = "chat_template.jinja"            # transformers 5.x saves the template here
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE)
# The named special tokens a chat template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
    """A checkpoint's tokenizer, with the semantics of ``AutoTokenizer.from_pretrained(folder)``
    (transformers 5.x, ``pip install tokenizers``).

    * ``encode(text)`` adds special tokens as ``tokenizer(text)["input_ids"]`` does: through the
      ``post_processor`` of ``tokenizer.json`` (e.g. a ``TemplateProcessing`` that puts ``<s>`` or
      ``<|begin_of_text|>`` first). transformers 5 drops ``add_bos_token``/``add_eos_token`` from
      ``tokenizer_config.json`` whenever ``tokenizer.json`` exists, so they change nothing here either
      (transformers 4's LlamaTokenizerFast rebuilt the post-processor from them).
    * ``decode(ids, skip_special_tokens=False)``, like ``tokenizer.decode``.
    * ``special_tokens``: the named special tokens (``bos_token`` ...) as strings, and
      ``chat_template``: the Jinja template (``chat_template.jinja`` wins over the config's entry),
      both what a chat template is rendered with (``minikv.chat``).
    """

    def __init__(self, folder: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError(
                "reading tokenizer.json needs the tokenizers package: pip install 'minikv[tokenizers]'"
            ) from None
        folder = Path(folder)
        # The files as read, so that save() writes back exactly what transformers would load. Each is
        # read only if it is a regular file of sane size (a FIFO would block, /dev/zero never ends).
        self.files: dict[str, str] = {}
        for name in TOKENIZER_FILES:
            path = folder / name
            if not (path.exists() or path.is_symlink()):
                continue
            cap = TOKENIZER_MAX_BYTES if name == TOKENIZER_FILE else JSON_MAX_BYTES
            data = read_bytes(path, "tokenizer file", TokenizerError, cap)
            try:
                self.files[name] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TokenizerError(f"tokenizer file {path} is not UTF-8 text ({exc})") from None
        try:
            self._tok = Tokenizer.from_str(self.files[TOKENIZER_FILE])
        except Exception as exc:       # the Rust library raises a bare Exception on a bad file
            raise TokenizerError(f"{folder / TOKENIZER_FILE} is not a valid tokenizer.json ({exc}); re-save it "
                                 "with tokenizer.save_pretrained") from None
        self.vocab_size = self._tok.get_vocab_size()
        config = _json_object(folder, TOKENIZER_CONFIG_FILE, self.files)
        legacy_map = _json_object(folder, SPECIAL_TOKENS_MAP_FILE, self.files)
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name) or legacy_map.get(name)
            if isinstance(value, dict):          # a serialised AddedToken: {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[name] = value
        self.chat_template = _chat_template(folder, config, self.files)
        # transformers ignores this cleanup for BPE models (it would eat real spaces before punctuation).
        self._clean_up_spaces = (bool(config.get("clean_up_tokenization_spaces", False))
                                 and type(self._tok.model).__name__ != "BPE")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # Type-checked, not range-checked: a model's vocabulary may be padded past the tokenizer's,
        # and the library skips ids it does not know.
        return self._decode(token_ids(ids, "ids", None), skip_special_tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """decode on ids already checked (a stream re-decodes its whole output every token)."""
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def token_id(self, token: str) -> Optional[int]:
        """The id of a token string (e.g. ``"<|im_end|>"``), or None when the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def stream_decoder(self) -> "_ReDecoder":
        return _ReDecoder(self)

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer files this tokenizer was read from into ``folder``."""
        for name, text in self.files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")


def _json_object(folder: Path, name: str, files: dict[str, str]) -> dict:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except (ValueError, RecursionError) as exc:     # RecursionError: absurdly deep nesting
        raise TokenizerError(f"{folder / name} is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{folder / name} must hold a JSON object, not {type(value).__name__}")
    return value


def _chat_template(folder: Path, config: dict, files: dict[str, str]) -> Optional[str]:
    """The default chat template: chat_template.jinja, else tokenizer_config.json's chat_template
    (a string, or a list of {"name", "template"} entries of which "default" is used, as in transformers)."""
    if CHAT_TEMPLATE_FILE in files:
        return files[CHAT_TEMPLATE_FILE]
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) and "name" in t for t in template):
        named = {t["name"]: t.get("template") for t in template}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise CheckpointError(f"{folder / TOKENIZER_CONFIG_FILE} has chat templates {sorted(named)} but none named "
                              "'default'; minikv renders the default template")
    raise CheckpointError(f"{folder / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of "
                          f"{{'name', 'template'}} entries, not {type(template).__name__}")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space WordPiece puts before punctuation and contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


class _ReDecoder:
    """Streams text from a subword tokenizer by decoding the whole output and emitting the new suffix
    (a token may change how its neighbours decode, so decoding tokens one by one is wrong)."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer, self._ids, self._emitted = tokenizer, [], ""

    def feed(self, token: int) -> str:
        self._ids += token_ids([token], "the streamed token", None)
        text = self._tokenizer._decode(self._ids)
        if text.endswith("\ufffd"):      # an incomplete multi-byte character: wait for more
            return ""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def flush(self) -> str:
        text = self._tokenizer._decode(self._ids)
        new, self._emitted = text[len(self._emitted):], text
        return new


def tokenizer_for(folder: Optional[Path], vocab_size: int):
    """The tokenizer of a checkpoint folder: its tokenizer.json, else bytes for a 256-token vocabulary."""
    tokenizer_json = None if folder is None else Path(folder) / TOKENIZER_FILE
    # A dangling link counts as present: it is reported (TokenizerError), never silently skipped.
    if tokenizer_json is not None and (tokenizer_json.exists() or tokenizer_json.is_symlink()):
        return HFTokenizer(folder)
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
