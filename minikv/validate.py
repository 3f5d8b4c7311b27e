"""Checks at the door: one function per kind of input, shared by every public entry point.

minikv checks each input once, where it enters (``load``, ``generate``, ``new_cache``, ...), and
trusts it inside. The checks for one kind of input live here so that every entry point refuses
the same values with the same message:

* integers (``max_new_tokens``, ``max_seq_len``, a seed, token ids): a Python or NumPy integer,
  never a bool (``True`` is an int in Python, but ``max_new_tokens=True`` is a bug) nor a float
  (``104.9`` must not quietly act as token 104), within the range the code can represent;
* memory a call would allocate, estimated in bytes before allocating it;
* files a checkpoint names: regular files only (a FIFO blocks a reader forever, ``/dev/zero``
  never ends, a directory is not a file), JSON read with a size cap and every decode or parse
  failure reported as the caller's error class naming the file.

Every refusal is a ``MinikvError`` subclass naming the bad value and the fix.
"""

from __future__ import annotations

import json
import numbers
import os
import stat
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import ConfigError, InvalidInputError, MinikvError

INT64_MAX = 2**63 - 1
# The largest size (layers, heads, dims, vocabulary, positions, batch) a config or a cache file may
# give: block tables are int32 in the kernels, and no real model comes near it in any dimension.
MAX_SIZE = 2**31 - 1

# Config-like JSON (config.json, generation_config.json, tokenizer_config.json, the shard index) is
# kilobytes; the largest real index files are a few MB. A file past this cap is not one of them.
JSON_MAX_BYTES = 64 * 2**20
# A tokenizer.json of a 256k vocabulary is ~35 MB.
TOKENIZER_MAX_BYTES = 512 * 2**20


# ---------------------------------------------------------------- arguments


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool (np.bool_ is not an Integral; Python's bool is)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value, name: str, *, minimum: int = 1, maximum: Optional[int] = None,
            error: type[MinikvError] = InvalidInputError, fix: str = "") -> int:
    """``value`` as a Python int in [minimum, maximum], or ``error`` naming it."""
    if not is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise error(f"{name}={value!r} must be an integer {bound}" + (f"; {fix}" if fix else ""))
    return int(value)


def optional_integer(value, name: str, **kwargs) -> Optional[int]:
    return None if value is None else integer(value, name, **kwargs)


def per_sequence(values, name: str, batch: int, minimum: int, maximum: int, noun: str) -> np.ndarray:
    """One integer per sequence of a batch (``n_new``, source ``lengths``, ...): ``batch`` integers in
    [minimum, maximum], as an int64 (batch,) array, or an InvalidInputError naming them."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu" or array.reshape(-1).shape != (batch,):
        raise InvalidInputError(f"{name}={values!r} must hold {batch} integer {noun} between {minimum} and {maximum}")
    array = array.astype(np.int64).reshape(-1)
    if array.min() < minimum or array.max() > maximum:
        raise InvalidInputError(f"{name}={array.tolist()} must hold {batch} {noun} between {minimum} and {maximum}")
    return array


def seed(value) -> Optional[int]:
    """A seed for ``numpy.random.default_rng``: None (fresh entropy) or an integer >= 0."""
    return optional_integer(value, "seed", minimum=0,
                            fix="pass a non-negative integer such as seed=0 (or rng=np.random.default_rng(...))")


def rng(value) -> np.random.Generator:
    if not isinstance(value, np.random.Generator):
        raise InvalidInputError(f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(0)); "
                                f"got {type(value).__name__}")
    return value


def token_ids(values, what: str, vocab_size: Optional[int]) -> list[int]:
    """A sequence of token ids as ints, each an integer in [0, vocab_size) (no float, str or bool).

    vocab_size None: any id a tokenizer can hold (0 .. 2**32 - 1; the tokenizers library's ids are u32)."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise InvalidInputError(f"{what} has shape {values.shape}; expected one row of token ids")
        values = values.tolist() if values.dtype.kind in "iu" else list(values)
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise InvalidInputError(f"{what} must be a list of integer token ids; got {values!r:.80}")
    out = []
    for t in values:
        if not is_integer(t):
            raise InvalidInputError(f"token id {t!r} in {what} is a {type(t).__name__}; token ids are integers "
                                    "(e.g. 104, not 104.9, '104' or True)")
        if vocab_size is None and not 0 <= t < 2**32:
            raise InvalidInputError(f"token id {t} in {what} is out of range: token ids are 0..2**32-1")
        if vocab_size is not None and not 0 <= t < vocab_size:
            raise InvalidInputError(f"token id {t} in {what} is out of range for a vocabulary of {vocab_size} "
                                    f"(valid ids are 0..{vocab_size - 1})")
        out.append(int(t))
    return out


def physical_memory() -> Optional[int]:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def allocation(nbytes: int, what: str, fix: str, error: type[MinikvError] = ConfigError) -> None:
    """Refuse to allocate more than the machine's RAM: NumPy would either raise a bare MemoryError or,
    with the OS overcommitting, hand back memory that fails only when it is first touched."""
    limit = physical_memory()
    if limit is not None and nbytes > limit:
        raise error(f"{what} would take {nbytes / 2**30:,.1f} GiB, more than this machine's "
                    f"{limit / 2**30:,.1f} GiB of RAM; {fix}")


# ---------------------------------------------------------------- files


def path_argument(value, what: str, error: type[MinikvError] = InvalidInputError) -> Path:
    """A path passed by the caller: a str or an os.PathLike of one (not bytes, a number or a list)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise error(f"{what}={value!r:.80} must be a path (a str or pathlib.Path)")
    return Path(value)


def regular_file(path, what: str, error: type[MinikvError]) -> Path:
    """``path`` if it is a regular file (symlinks to one are fine: the Hugging Face cache is made of them).

    Checked with ``os.stat`` before opening: opening a FIFO blocks until a writer comes, and a
    device such as /dev/zero reads forever."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:    # ValueError: a NUL byte in the name
        raise error(f"{what} {path} could not be read: {exc}") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise error(f"{what} {path} is {kind}; it must be a regular file")
    return path


def writable_file(path, what: str, error: type[MinikvError]) -> Path:
    """``path`` if writing it replaces a regular file or creates one: writing into a FIFO would block
    until a reader comes, and a directory or device there is not ours to replace."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:     # e.g. a dangling symlink
            raise error(f"cannot write {what} {path}: {exc}") from None
        if not stat.S_ISREG(mode):
            raise error(f"cannot write {what} {path}: something other than a regular file is there "
                        "(a folder, FIFO or device); remove it or choose another folder")
    return path


def read_bytes(path, what: str, error: type[MinikvError], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, or ``error`` naming it."""
    path = regular_file(path, what, error)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)      # + 1: tells "exactly the cap" from "more"
    except OSError as exc:
        raise error(f"{what} {path} could not be read: {exc}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path} is larger than {max_bytes / 2**20:.0f} MiB; it cannot be a real {what}")
    return data


def read_json(path, what: str, error: type[MinikvError], max_bytes: int = JSON_MAX_BYTES) -> Any:
    """Parse a small JSON file; invalid UTF-8, bad JSON, absurd nesting or numbers are ``error``."""
    data = read_bytes(path, what, error, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc}); JSON files are UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be a real {what}") from None
    except ValueError as exc:     # JSONDecodeError, an int of more than 4300 digits
        raise error(f"{what} {path} is not valid JSON ({exc}); re-save it with save_pretrained") from None
