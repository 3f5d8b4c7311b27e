"""Every error minikv raises on bad input is a ``MinikvError``.

Each message names the bad value and says how to fix it, e.g.::

    CacheOverflowError: static cache holds 256 positions; writing 8 more at
    position 252 would exceed it (pass max_seq_len>=260)

Subclasses that reject a bad *value* also derive from ``ValueError`` so code
written against the standard library's conventions still catches them.
"""


class MinikvError(Exception):
    """Base class of every error minikv raises on purpose."""


class ConfigError(MinikvError, ValueError):
    """A model configuration minikv cannot run correctly (names the field)."""


class CheckpointError(MinikvError):
    """A checkpoint folder or file that is missing, corrupt or disagrees with its config."""


class TokenizerError(CheckpointError):
    """A tokenizer file (tokenizer.json) that is missing, not a regular file, or corrupt."""


class CacheOverflowError(MinikvError):
    """Writing into a KV cache past its capacity."""


class CacheRewindError(MinikvError):
    """Rewinding a KV cache to positions it no longer holds (a ring that has overwritten them)."""


class CacheMismatchError(MinikvError, ValueError):
    """A KV cache that was built for another model (layers, heads, head_dim) or batch."""


class BackendUnavailableError(MinikvError):
    """A backend whose hardware or packages are missing; the message says what to install."""


class InvalidInputError(MinikvError, ValueError):
    """Token ids out of range, an empty sequence, a badly shaped array."""


class SequenceTooLongError(InvalidInputError):
    """A sequence longer than the model's maximum position."""


class SamplingError(MinikvError, ValueError):
    """An impossible sampling parameter (temperature < 0, top_p outside (0, 1], ...)."""


class ChatTemplateError(MinikvError):
    """A chat that cannot be rendered: no chat template, or the template refused the messages."""


class UnknownOptionError(MinikvError, TypeError):
    """A keyword argument the function does not take; the message names the nearest valid one."""


def unknown_option(name: str, valid, where: str) -> UnknownOptionError:
    """The error for keyword ``name`` passed to ``where``: "did you mean ...?" from ``valid`` (difflib)."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"valid options: {', '.join(valid)}"
    return UnknownOptionError(f"{where} got an unknown keyword argument {name!r}; {hint}")
