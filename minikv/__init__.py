"""minikv: transformer inference from scratch in NumPy, written to be read.

    import minikv
    model = minikv.load()                                   # the bundled tiny model
    out = model.generate("Once upon", max_new_tokens=50, cache="static")
    print(out.text, out.stats)
"""

from . import attention, cache, layers, quant, rope, sampling
from .backend import Backend, available_backends, get_backend
from .cache import CACHE_KINDS, KVCache, load_cache
from .config import ModelConfig
from .errors import (BackendUnavailableError, CacheMismatchError, CacheOverflowError, CacheRewindError,
                     ChatTemplateError, CheckpointError, ConfigError, InvalidInputError, MinikvError, SamplingError,
                     SequenceTooLongError, TokenizerError, UnknownOptionError)
from .generate import GenerationOutput, GenerationStats, TokenEvent
from .model import BUNDLED_MODEL, Transformer, load
from .sampling import SamplingParams
from .tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "attention", "cache", "layers", "quant", "rope", "sampling",
    "Backend", "available_backends", "get_backend", "CACHE_KINDS", "KVCache", "load_cache", "ModelConfig",
    "MinikvError", "ConfigError", "CheckpointError", "CacheOverflowError", "CacheMismatchError", "CacheRewindError",
    "BackendUnavailableError", "InvalidInputError", "SequenceTooLongError", "SamplingError", "ChatTemplateError",
    "TokenizerError", "UnknownOptionError",
    "GenerationOutput", "GenerationStats", "TokenEvent", "SamplingParams",
    "BUNDLED_MODEL", "Transformer", "load", "ByteTokenizer", "__version__",
]
