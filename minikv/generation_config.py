"""``generation_config.json``: a checkpoint's own stop ids and default sampling settings.

Hugging Face checkpoints ship how they are meant to be sampled next to their weights, e.g. Qwen3's::

    {"eos_token_id": [151645, 151643], "do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95}

``GenerationConfig.from_json`` reads the fields minikv uses and ``defaults()`` turns them into
keyword arguments of ``generate``, with transformers' meaning:

* ``eos_token_id`` (one id or a list): every id ends a sequence (they win over config.json's).
* ``do_sample`` false or absent: greedy (``temperature=0.0``), whatever temperature the file gives.
* ``do_sample`` true: ``temperature`` (default 1.0), ``top_k`` (transformers' default 50 when the file
  gives none; 0 turns it off), ``top_p`` (1.0 is off), ``min_p``.
* ``repetition_penalty``, ``max_new_tokens``.

Arguments passed to ``generate`` explicitly always win over these defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .validate import INT64_MAX, read_json

GENERATION_CONFIG_FILE = "generation_config.json"
HF_DEFAULT_TOP_K = 50      # transformers' GenerationConfig default, used when do_sample is true


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    max_new_tokens: Optional[int] = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)   # the file's object, written back by save

    @classmethod
    def from_dict(cls, hf: dict[str, Any], source: str = GENERATION_CONFIG_FILE) -> "GenerationConfig":
        def number(key: str, low: float, high: float = math.inf, integer: bool = False):
            value = hf.get(key)
            if value is None:
                return None
            kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not kind_ok or not low <= value <= high:
                what = "an integer" if integer else "a number"
                raise ConfigError(f"{source}: {key}={value!r} must be {what} in [{low}, {high}] or null")
            return value if integer else float(value)

        eos = hf.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
        for token in eos_list:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= INT64_MAX:
                raise ConfigError(f"{source}: eos_token_id={eos!r} must be a token id or a list of token ids")
        do_sample = hf.get("do_sample", False)
        if not isinstance(do_sample, bool) and do_sample is not None:
            raise ConfigError(f"{source}: do_sample={do_sample!r} must be true or false")
        return cls(eos_token_ids=tuple(eos_list), do_sample=bool(do_sample),
                   temperature=number("temperature", 0.0), top_k=number("top_k", 0, integer=True),
                   top_p=number("top_p", 0.0, 1.0), min_p=number("min_p", 0.0, 1.0),
                   repetition_penalty=number("repetition_penalty", 0.0),
                   max_new_tokens=number("max_new_tokens", 1, integer=True), raw=dict(hf))

    @classmethod
    def from_json(cls, path: str | Path) -> "GenerationConfig":
        path = Path(path)
        hf = read_json(path, "generation config", ConfigError)     # regular file, size cap, UTF-8, nesting
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(hf).__name__}")
        return cls.from_dict(hf, source=str(path))

    def defaults(self) -> dict[str, Any]:
        """The keyword arguments of ``generate`` this file sets (explicit arguments override them)."""
        out: dict[str, Any] = {}
        if self.eos_token_ids:
            out["stop_tokens"] = list(self.eos_token_ids)
        if self.do_sample:
            out["temperature"] = 1.0 if self.temperature is None else self.temperature
            top_k = HF_DEFAULT_TOP_K if self.top_k is None else self.top_k
            out["top_k"] = top_k or None                       # 0 means off, as in transformers
            out["top_p"] = None if self.top_p in (None, 1.0) else self.top_p
            out["min_p"] = self.min_p
        else:
            out["temperature"] = 0.0                           # greedy: the file's temperature is unused
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = self.repetition_penalty
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        return out

    def save(self, folder: str | Path) -> None:
        (Path(folder) / GENERATION_CONFIG_FILE).write_text(json.dumps(self.raw, indent=2) + "\n")


def read_generation_config(folder: Optional[Path]) -> Optional[GenerationConfig]:
    """A checkpoint folder's generation_config.json, or None when it has none."""
    path = None if folder is None else Path(folder) / GENERATION_CONFIG_FILE
    # Present but not a regular file (a FIFO, a directory, a dangling link) is reported, not skipped.
    if path is None or not (path.exists() or path.is_symlink()):
        return None
    return GenerationConfig.from_json(Path(folder) / GENERATION_CONFIG_FILE)
