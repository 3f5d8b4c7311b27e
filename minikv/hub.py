"""Where checkpoints come from: a local folder, or a Hugging Face Hub id such as ``"Qwen/Qwen3-0.6B"``.

``minikv.load("Org/name")`` (when no such folder exists) asks ``huggingface_hub`` (``pip install
'minikv[hub]'``) for the checkpoint, in this order:

1. the local Hugging Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``): no network,
   the same files ``transformers`` and ``hf download`` put there;
2. a download into that cache, unless ``HF_HUB_OFFLINE=1`` or the network is unreachable.

Only the files minikv reads are fetched (safetensors, never pickle). When neither way works the
error says what both ways needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

# What minikv reads from a checkpoint; *.bin / *.pt (pickle) are never downloaded.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
# owner/name as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_checkpoint(path) -> Path:
    """The checkpoint folder for ``path``: the folder itself when it exists, else a Hub id's snapshot."""
    folder = Path(path)
    if folder.exists() or not _HUB_ID.match(str(path)):
        return folder            # a folder (or a bad path: load_checkpoint names what is missing)
    return hub_snapshot(str(path))


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hub repository: from the cache, else downloaded."""
    both_ways = (f"either download it once (`hf download {repo_id}`, huggingface_hub's command, or minikv.load "
                 "with the network on) or pass the path of a checkpoint folder holding config.json and "
                 "model.safetensors")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a folder here, and reading it as a Hugging Face Hub id needs huggingface_hub: "
            f"pip install 'minikv[hub]'; or pass the path of a checkpoint folder holding config.json and "
            "model.safetensors"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception as exc:      # not cached (LocalEntryNotFoundError), or an id the Hub refuses
        cached_error = _one_line(exc)
    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{repo_id!r} is not a folder here and not in {where}, and HF_HUB_OFFLINE=1 forbids downloading it "
            f"({cached_error}); {both_ways}"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:      # no network, no such repository, a gated one without a token...
        raise CheckpointError(
            f"{repo_id!r} is not a folder here and not in {where}, and downloading it failed "
            f"({_one_line(exc)}); {both_ways}"
        ) from None


def _one_line(exc: Exception) -> str:
    """huggingface_hub's messages span lines; an error of ours is one line."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())
