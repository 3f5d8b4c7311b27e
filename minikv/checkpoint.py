"""Load and save Hugging Face checkpoint folders (``config.json`` + safetensors), never pickle.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor.

Hugging Face and minikv name tensors differently. The translation lives in exactly one place,
``tensor_table(config)``: one row per Hugging Face tensor, saying which minikv tensor(s) it becomes
and how its layout changes. minikv's canonical names use PyTorch's (out_features, in_features)
layout for projections; GPT-2's ``Conv1D`` stores (in, out), so its rows say ``transpose``, and
its fused ``c_attn`` splits into q, k and v.

Tensors are read one at a time (``read_safetensors``) and converted right away to the model dtype:
float32, float64, float16 and bfloat16 files are read (bfloat16 by widening its bits, see
``bfloat16_to_float32``), so loading never holds a second full copy of the weights.

Every problem is a ``CheckpointError`` naming the file or tensor and what was expected: a missing
tensor, an unexpected one, a shape that disagrees with the config, a dtype minikv does not read
(float8, integers), a truncated or corrupt file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .validate import is_integer, path_argument, read_json, regular_file, writable_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Buffers some exporters write that carry no weights (masks, cached RoPE frequencies): skipped on load.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class TensorMapping:
    """One Hugging Face tensor and the minikv tensor(s) it becomes.

    ``ours`` has one name, or several when the HF tensor is a fused projection split along its
    output axis (GPT-2's c_attn -> q, k, v). ``transpose`` marks Conv1D's (in, out) layout.
    """

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical minikv tensor name and its shape, projections as (out, in)."""
    d, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, d), "final_norm.weight": (d,)}
    if config.family == "gpt2":
        shapes["pos_embed.weight"] = (config.max_position_embeddings, d)
        shapes["final_norm.bias"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "mlp_norm.weight"] = (d,)
        if config.family == "gpt2":
            shapes[p + "attn_norm.bias"] = (d,)
            shapes[p + "mlp_norm.bias"] = (d,)
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"attn.{proj}.weight"] = (out, d)
            if config.qkv_bias:
                shapes[p + f"attn.{proj}.bias"] = (out,)
        shapes[p + "attn.o.weight"] = (d, q_out)
        if config.o_bias:
            shapes[p + "attn.o.bias"] = (d,)
        mlp_in = ("up",) if config.family == "gpt2" else ("gate", "up")
        for proj in mlp_in:
            shapes[p + f"mlp.{proj}.weight"] = (inter, d)
            if config.mlp_bias:
                shapes[p + f"mlp.{proj}.bias"] = (inter,)
        shapes[p + "mlp.down.weight"] = (d, inter)
        if config.mlp_bias:
            shapes[p + "mlp.down.bias"] = (d,)
        if config.qk_norm:
            shapes[p + "attn.q_norm.weight"] = (hd,)
            shapes[p + "attn.k_norm.weight"] = (hd,)
        if config.is_gemma3:
            shapes[p + "post_attn_norm.weight"] = (d,)
            shapes[p + "post_mlp_norm.weight"] = (d,)
    return shapes


def tensor_table(config: ModelConfig) -> list[TensorMapping]:
    """The one name/layout table between Hugging Face checkpoints and minikv."""
    rows: list[TensorMapping] = []
    if config.family == "gpt2":
        rows += [TensorMapping("transformer.wte.weight", ("embed.weight",)),
                 TensorMapping("transformer.wpe.weight", ("pos_embed.weight",)),
                 TensorMapping("transformer.ln_f.weight", ("final_norm.weight",)),
                 TensorMapping("transformer.ln_f.bias", ("final_norm.bias",))]
        for i in range(config.n_layers):
            hf, p = f"transformer.h.{i}.", f"layers.{i}."
            rows += [
                TensorMapping(hf + "ln_1.weight", (p + "attn_norm.weight",)),
                TensorMapping(hf + "ln_1.bias", (p + "attn_norm.bias",)),
                TensorMapping(hf + "attn.c_attn.weight", tuple(p + f"attn.{x}.weight" for x in "qkv"), transpose=True),
                TensorMapping(hf + "attn.c_attn.bias", tuple(p + f"attn.{x}.bias" for x in "qkv")),
                TensorMapping(hf + "attn.c_proj.weight", (p + "attn.o.weight",), transpose=True),
                TensorMapping(hf + "attn.c_proj.bias", (p + "attn.o.bias",)),
                TensorMapping(hf + "ln_2.weight", (p + "mlp_norm.weight",)),
                TensorMapping(hf + "ln_2.bias", (p + "mlp_norm.bias",)),
                TensorMapping(hf + "mlp.c_fc.weight", (p + "mlp.up.weight",), transpose=True),
                TensorMapping(hf + "mlp.c_fc.bias", (p + "mlp.up.bias",)),
                TensorMapping(hf + "mlp.c_proj.weight", (p + "mlp.down.weight",), transpose=True),
                TensorMapping(hf + "mlp.c_proj.bias", (p + "mlp.down.bias",)),
            ]
        return rows
    rows += [TensorMapping("model.embed_tokens.weight", ("embed.weight",)),
             TensorMapping("model.norm.weight", ("final_norm.weight",))]
    if not config.tie_word_embeddings:
        rows.append(TensorMapping("lm_head.weight", ("lm_head.weight",)))
    hf_proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for i in range(config.n_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        if config.is_gemma3:
            # Gemma's "post_attention_layernorm" normalises the attention *output*; the MLP's input norm
            # is "pre_feedforward_layernorm" (in LLaMA, post_attention_layernorm is the MLP's input norm).
            rows += [TensorMapping(hf + "input_layernorm.weight", (p + "attn_norm.weight",)),
                     TensorMapping(hf + "post_attention_layernorm.weight", (p + "post_attn_norm.weight",)),
                     TensorMapping(hf + "pre_feedforward_layernorm.weight", (p + "mlp_norm.weight",)),
                     TensorMapping(hf + "post_feedforward_layernorm.weight", (p + "post_mlp_norm.weight",))]
        else:
            rows += [TensorMapping(hf + "input_layernorm.weight", (p + "attn_norm.weight",)),
                     TensorMapping(hf + "post_attention_layernorm.weight", (p + "mlp_norm.weight",))]
        if config.qk_norm:
            rows += [TensorMapping(hf + "self_attn.q_norm.weight", (p + "attn.q_norm.weight",)),
                     TensorMapping(hf + "self_attn.k_norm.weight", (p + "attn.k_norm.weight",))]
        for ours, theirs in hf_proj.items():
            block = "self_attn" if ours in "qkvo" else "mlp"
            mine = f"attn.{ours}" if block == "self_attn" else f"mlp.{ours}"
            rows.append(TensorMapping(f"{hf}{block}.{theirs}.weight", (p + mine + ".weight",)))
            has_bias = (config.qkv_bias and ours in "qkv") or (config.o_bias and ours == "o") or (
                config.mlp_bias and block == "mlp")
            if has_bias:
                rows.append(TensorMapping(f"{hf}{block}.{theirs}.bias", (p + mine + ".bias",)))
    return rows


def _normalise_hf_name(name: str, config: ModelConfig) -> str:
    # Some GPT-2 exports (OpenAI's originals) omit the "transformer." prefix.
    if config.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


# ---------------------------------------------------------------- reading


def _exists(path: Path) -> bool:
    # A dangling symlink or an unreadable entry still "exists" here, so that it is reported, not skipped.
    return path.exists() or path.is_symlink()


def _shard_name_is_local(name: str) -> bool:
    """A shard name must stay inside the folder, judged on the name alone (no resolving): no absolute
    path, no drive, no '..'. Symlinks are not followed here, so the Hugging Face cache layout (snapshot
    files that link into ../../blobs) keeps working."""
    if not name or "\0" in name:
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            return False
    return True


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if _exists(single):
        return [regular_file(single, "weights file", CheckpointError)]
    if _exists(index):
        try:
            weight_map = read_json(index, "safetensors index", CheckpointError)["weight_map"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map each tensor name to a shard file name")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if not _shard_name_is_local(s)]
        if outside:
            raise CheckpointError(f"{index} names shard(s) {outside[:3]} outside the checkpoint folder; a shard "
                                  "name must be a relative path without '..'")
        missing = [s for s in shards if not _exists(folder / s)]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing[:5]} that are not in {folder}")
        return [regular_file(folder / s, "shard", CheckpointError) for s in shards]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder} holds only pickle weights (.bin/.pt); minikv never unpickles. Convert them to safetensors "
            "(transformers: model.save_pretrained(path, safe_serialization=True))"
        )
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {folder}")


# The safetensors library refuses headers above 100 MB; so do we (a real one is kilobytes to a few MB).
MAX_HEADER_BYTES = 100_000_000
# safetensors dtype names -> the little-endian NumPy dtype of their bytes. bfloat16 has no NumPy
# dtype: its bytes are read as uint16 and widened by bfloat16_to_float32 (below).
FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# Names for the error message of a dtype minikv refuses (float8 needs per-block scales minikv does not implement).
OTHER_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F4": "float4",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
                "U16": "uint16", "U8": "uint8", "BOOL": "bool", "C64": "complex64"}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values, exactly.

    bfloat16 is the top half of a float32 (1 sign bit, the same 8 exponent bits, 7 of the 23 mantissa
    bits), so ``float32_bits = bf16_bits << 16`` is the same number for every one of the 65536 patterns,
    zeros, subnormals, infinities and NaNs included (NaN payloads are kept). Doing it with NumPy's
    integer ops keeps the base install free of a bfloat16 package (ml_dtypes would do the same thing;
    the tests compare against it).
    """
    widened = bits.astype(np.uint32)       # (n,) uint16 -> (n,) uint32: the only new array
    widened <<= 16
    return widened.view(np.float32)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, data_start) of a safetensors file: 8-byte little-endian header length n, n bytes of
    JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data. Checked here so a
    truncated or corrupt file is a CheckpointError before any tensor is read."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {why}")

    path = regular_file(path, "safetensors file", CheckpointError)    # not a FIFO, device or folder

    path = regular_file(path, "safetensors file", CheckpointError)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise corrupt(f"{size} bytes is shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise corrupt(f"the header claims {n} bytes but the file has {size - 8} after the length")
            if n > MAX_HEADER_BYTES:     # the safetensors library's own limit
                raise corrupt(f"the header claims {n} bytes, more than safetensors allows ({MAX_HEADER_BYTES})")
            header = json.loads(file.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path} could not be read: {exc}") from None
    except RecursionError:
        raise corrupt("the header is nested too deeply to be a safetensors header") from None
    except ValueError as exc:      # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise corrupt(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = list(info["shape"])
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed entry {info!r:.200}") from None
        # Integers only (int("3") or int(2.5) would quietly read another shape), and sizes in Python
        # ints: np.prod of a huge shape wraps around int64 and could match the byte count.
        if not all(is_integer(x) for x in [begin, end, *shape]) or not isinstance(dtype, str):
            raise corrupt(f"tensor {name!r} has a malformed entry {info!r:.200} (offsets and shape are integers, "
                          "dtype a name)")
        if not (0 <= begin <= end <= data_size) or min(shape, default=0) < 0:
            raise corrupt(f"tensor {name!r} spans bytes {begin}..{end} of {data_size} data bytes")
        if dtype in FLOAT_DTYPES and end - begin != FLOAT_DTYPES[dtype].itemsize * math.prod(shape):
            raise corrupt(f"tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
    return header, 8 + n


def read_safetensors(path: Path, dtype=None, skip=lambda name: False) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (except those ``skip(name)`` rejects) as NumPy arrays.

    Tensor by tensor: each one's bytes are read, converted to ``dtype`` (None: float16/32/64 stay as
    stored, bfloat16 becomes float32), and only the converted array is kept. So loading a bfloat16
    checkpoint as float32 peaks at the float32 weights plus one tensor's bytes, never two copies.
    float8, integer and other dtypes are a CheckpointError naming the tensor and its dtype."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as file:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if skip(name):
                continue
            stored = info["dtype"]
            if stored not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {path} has dtype {stored} ({OTHER_DTYPES.get(stored, 'unknown')}); "
                    "minikv reads float32, float64, float16 and bfloat16 weights: use a release of the "
                    "checkpoint stored in one of those"
                )
            shape = tuple(int(d) for d in info["shape"])
            file.seek(data_start + info["data_offsets"][0])
            raw = np.fromfile(file, dtype=FLOAT_DTYPES[stored], count=int(np.prod(shape)))
            tensor = bfloat16_to_float32(raw) if stored == "BF16" else raw
            del raw
            if dtype is not None and tensor.dtype != dtype:
                with np.errstate(over="ignore"):   # float64 -> float32 overflow becomes inf, refused later
                    tensor = tensor.astype(dtype)
            tensors[name] = tensor.reshape(shape).astype(tensor.dtype.newbyteorder("="), copy=False)
    return tensors


def load_checkpoint(path: str | Path, dtype="float32") -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a Hugging Face checkpoint folder into (config, weights with minikv's canonical names).

    Weights are converted to ``dtype`` here, once, one tensor at a time (see read_safetensors)."""
    folder = Path(path)
    if "\0" in str(folder) or not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is not a folder (it needs config.json and model.safetensors)")
    config = ModelConfig.from_json(folder / CONFIG_FILE)
    dtype = np.dtype(dtype)
    raw: dict[str, np.ndarray] = {}
    found_in: dict[str, Path] = {}
    for file in _weight_files(folder):
        tensors = read_safetensors(file, dtype=dtype,
                                   skip=lambda name: _normalise_hf_name(name, config).endswith(IGNORED_SUFFIXES))
        for name, tensor in tensors.items():
            name = _normalise_hf_name(name, config)
            if name in found_in:
                # Two shards with one tensor: which one is right is a guess, so refuse.
                raise CheckpointError(f"tensor {name!r} is in both {found_in[name].name} and {file.name} in {folder}")
            raw[name], found_in[name] = tensor, file
        del tensors
    return config, weights_from_hf(raw, config, dtype, source=str(folder), consume=True)


def weights_from_hf(raw: dict[str, np.ndarray], config: ModelConfig, dtype=np.float32,
                    source: str = "checkpoint", consume: bool = False) -> dict[str, np.ndarray]:
    """Translate HF-named tensors to minikv's names and layouts, checking every name and shape.

    consume=True empties ``raw`` as it goes, so a tensor that needs a new layout (a transpose, a split)
    never exists twice for longer than its own conversion."""
    dtype = np.dtype(dtype)
    _check_tensor_count(raw, config, source)
    table = tensor_table(config)
    known = {row.hf for row in table}
    unexpected = [n for n in raw if n not in known and not n.endswith(IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise CheckpointError(
            f"{source} has unexpected tensor(s) {sorted(unexpected)[:5]} for model_type={config.model_type!r}; "
            "is config.json from another model?"
        )
    shapes = expected_shapes(config)
    weights: dict[str, np.ndarray] = {}
    for row in table:
        if row.hf not in raw:
            raise CheckpointError(f"{source} is missing tensor {row.hf!r} (minikv {row.ours[0]!r}, "
                                  f"expected shape {_hf_shape(row, shapes)})")
        tensor = raw.pop(row.hf) if consume else raw[row.hf]
        if not np.issubdtype(tensor.dtype, np.floating):
            raise CheckpointError(f"tensor {row.hf!r} in {source} has dtype {tensor.dtype}; expected floating point")
        want = _hf_shape(row, shapes)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"tensor {row.hf!r} in {source} has shape {tuple(tensor.shape)}; "
                                  f"the config implies {want}")
        if row.transpose:
            tensor = tensor.T
        # Split a fused projection along its output axis (axis 0 in the (out, in) layout).
        sizes = [shapes[name][0] for name in row.ours]
        parts = np.split(tensor, np.cumsum(sizes)[:-1], axis=0) if len(row.ours) > 1 else [tensor]
        for name, part in zip(row.ours, parts):
            with np.errstate(over="ignore"):   # an overflow becomes inf, refused just below
                weights[name] = np.ascontiguousarray(part, dtype=dtype)
            # Checked after the conversion: a float64 value beyond float32's range becomes inf here.
            if not np.isfinite(weights[name]).all():
                raise CheckpointError(f"tensor {row.hf!r} (minikv {name!r}) in {source} holds NaN or infinite "
                                      f"values as {dtype.name}; the checkpoint is corrupt or overflows {dtype.name}")
    return weights


# The fewest tensors one layer can have (llama: two norms and seven projections; gpt2: twelve).
MIN_TENSORS_PER_LAYER = {"llama": 9, "gpt2": 12}


def _check_tensor_count(raw: dict[str, np.ndarray], config: ModelConfig, source: str) -> None:
    """Compare the config's layer count with the tensors present before building any per-layer table: a
    config saying num_hidden_layers=10**9 must fail here, not after a table of 10**10 rows."""
    needed = config.n_layers * MIN_TENSORS_PER_LAYER[config.family]
    if needed > len(raw):
        raise CheckpointError(
            f"config says {config.n_layers} layers (at least {needed} tensors) but {source} holds only {len(raw)} "
            "tensors; is config.json from another model?"
        )


def _hf_shape(row: TensorMapping, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    parts = [shapes[name] for name in row.ours]
    fused = (sum(s[0] for s in parts),) + parts[0][1:]
    return tuple(reversed(fused)) if row.transpose else fused


# ---------------------------------------------------------------- writing


def weights_to_hf(weights: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of ``weights_from_hf``: minikv names back to Hugging Face names and layouts."""
    out = {}
    for row in tensor_table(config):
        tensor = np.concatenate([weights[n] for n in row.ours], axis=0) if len(row.ours) > 1 else weights[row.ours[0]]
        out[row.hf] = np.ascontiguousarray(tensor.T if row.transpose else tensor)
    return out


def save_checkpoint(path: str | Path, config: ModelConfig, weights: dict[str, np.ndarray],
                    dtype: Optional[str] = None) -> Path:
    """Write a Hugging Face checkpoint folder (config.json + model.safetensors) that transformers loads."""
    from safetensors.numpy import save_file

    folder = path_argument(path, "path")
    if _exists(folder) and not folder.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {folder}: it is a file, and a checkpoint is a folder "
                              "(config.json + model.safetensors); pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint folder {folder}: {exc}") from None
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        writable_file(folder / name, "checkpoint file", CheckpointError)
    hf = weights_to_hf(weights, config)
    if dtype is not None:
        hf = {k: v.astype(dtype) for k, v in hf.items()}
    config_dict = config.to_hf()
    config_dict["torch_dtype"] = str(next(iter(hf.values())).dtype)
    try:
        (folder / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2) + "\n")
        save_file(hf, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint to {folder}: {exc}") from None
    return folder
