"""The hostile-file fuzz, run in a child process by tests/test_fuzz_hostile.py (issue 18).

    python tests/hostile_fuzz.py checkpoint|cache [max_examples] [random]

Hypothesis mutates real files: checkpoint folders (a copy of a committed fixture or of the bundled
model: config values, the safetensors header, the file types, a shard index) and saved KV caches
(metadata, tensors, lengths, block tables, the raw header). Each mutated file is loaded and, when
that succeeds, used (a forward pass; a cache continues a generation). The only outcomes allowed are
success or a ``MinikvError``; anything else (IndexError, MemoryError, a numba segfault, a hang) fails.

The parent runs this file with a memory cap (RLIMIT_AS) and a timeout, so a crash or a hang fails
the test and not the whole suite; this file exits 0 when every example passed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import sys
import tempfile
from pathlib import Path

MEMORY_CAP = 2 * 2**30

if __name__ == "__main__":      # before NumPy and its BLAS threads exist
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import minikv  # noqa: E402
from minikv.errors import MinikvError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SOURCES = [FIXTURES / "hf" / name for name in ("llama_gqa", "gpt2", "mistral_window")] + [
    FIXTURES / "chat" / "chatml",                          # with tokenizer.json, tokenizer_config.json
    FIXTURES / "hf_families" / "gemma3_text", FIXTURES / "hf_families" / "llama_rope_yarn",   # bfloat16 files
    FIXTURES / "seq2seq" / "t5_v1_1", FIXTURES / "seq2seq" / "bart"]                        # encoder-decoders
TOKENIZER_CONFIG_KEYS = ["chat_template", "bos_token", "eos_token", "pad_token", "clean_up_tokenization_spaces",
                         "added_tokens_decoder", "model_max_length"]

# ---------------------------------------------------------------- values a hostile file may hold

HUGE_INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 4 * 2**20, 10**9, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**12, 10**30, -2**63])
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), HUGE_INTS, st.integers(-5, 300),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
DTYPES = st.sampled_from(["F32", "F64", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "U8", "BOOL", "XX", ""])
SHAPES = st.one_of(st.lists(st.integers(-2, 130), max_size=4), st.lists(HUGE_INTS, min_size=1, max_size=3),
                   JSON_VALUES)


# Every field minikv's config reader looks at (either family), present in the file or not.
CONFIG_KEYS = ["activation_function", "add_cross_attention", "attention_bias", "bos_token_id", "eos_token_id",
               "head_dim", "hidden_act", "hidden_size", "intermediate_size", "layer_norm_epsilon", "layer_types",
               "max_position_embeddings", "mlp_bias", "model_type", "n_embd", "n_head", "n_inner", "n_layer",
               "n_positions", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp",
               "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta", "scale_attn_by_inverse_layer_idx",
               "scale_attn_weights", "sliding_window", "tie_word_embeddings", "use_sliding_window", "vocab_size",
               "partial_rotary_factor", "torch_dtype", "dtype"]


def split_safetensors(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    if n > len(data):
        raise ValueError("header length beyond the file")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def mutate_header(data: bytes, draw) -> bytes:
    """One change to the safetensors header: a dtype, a shape, offsets, the length prefix, the bytes."""
    how = draw(st.sampled_from(["dtype", "shape", "offsets", "length", "truncate", "flip", "drop", "junk"]))
    if len(data) < 8:
        return data + draw(st.binary(max_size=16))
    if how == "length":
        return struct.pack("<Q", draw(st.one_of(HUGE_INTS.filter(lambda v: 0 <= v < 2**64),
                                                st.integers(0, len(data) + 8)))) + data[8:]
    if how == "truncate":
        return data[:draw(st.integers(0, len(data)))]
    if how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    try:
        header, body = split_safetensors(data)
    except (ValueError, struct.error):     # an earlier mutation already broke the header
        return data
    names = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
    if not names:
        return data
    name = draw(st.sampled_from(names))
    if how in ("dtype", "shape", "offsets") and not isinstance(header[name], dict):
        header[name] = {}
    if how == "dtype":
        header[name]["dtype"] = draw(DTYPES)
    elif how == "shape":
        header[name]["shape"] = draw(SHAPES)
    elif how == "offsets":
        header[name]["data_offsets"] = draw(st.one_of(st.lists(st.one_of(HUGE_INTS, st.integers(0, len(body) + 9)),
                                                               max_size=3), JSON_VALUES))
    elif how == "drop":
        del header[name]
    else:
        header[name] = draw(JSON_VALUES)
    return join_safetensors(header, body)


# ---------------------------------------------------------------- checkpoint folders


def mutate_folder(folder: Path, source: Path, draw) -> None:
    how = draw(st.sampled_from(["config", "config", "header", "header", "filetype", "index", "generation",
                                "tokenizer_config"]))
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if how == "config" and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (ValueError, RecursionError):      # an earlier mutation broke it: nothing more to edit
            return
        if not isinstance(config, dict):
            return
        keys = sorted(set(config) | set(CONFIG_KEYS))
        for _ in range(draw(st.integers(1, 3))):
            config[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
        config_path.write_text(json.dumps(config))
    elif how == "header" and weights.is_file():      # (not a FIFO made by an earlier mutation)
        weights.write_bytes(mutate_header(weights.read_bytes(), draw))
    elif how == "filetype":
        target = draw(st.sampled_from([config_path, weights, folder / "tokenizer.json",
                                       folder / "tokenizer_config.json", folder / "generation_config.json"]))
        kind = draw(st.sampled_from(["fifo", "dir", "dev_zero", "empty", "junk", "dangling", "deep_json"]))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "dir":
            target.mkdir()
        elif kind == "dev_zero":
            target.symlink_to("/dev/zero")
        elif kind == "dangling":
            target.symlink_to(folder / "nothing-here")
        elif kind == "deep_json":
            target.write_text("[" * 100_000)
        else:
            target.write_bytes(b"" if kind == "empty" else draw(st.binary(max_size=64)))
    elif how == "index":
        names = [n for n in split_safetensors((source / "model.safetensors").read_bytes())[0] if n != "__metadata__"]
        shard = draw(st.sampled_from(["shard.safetensors", "../shard.safetensors", "/etc/passwd", "",
                                      "sub/../shard.safetensors", "missing.safetensors", "."]))
        if weights.is_file() and not weights.is_symlink():
            weights.rename(folder / "shard.safetensors")
        index = {"weight_map": {n: shard for n in names}}
        if draw(st.booleans()):
            index = draw(JSON_VALUES)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "tokenizer_config" and (folder / "tokenizer_config.json").is_file():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (ValueError, RecursionError):
            return
        if isinstance(config, dict):
            config[draw(st.sampled_from(TOKENIZER_CONFIG_KEYS))] = draw(JSON_VALUES)
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
    elif how == "generation":
        target = folder / "generation_config.json"
        if not (target.exists() or target.is_symlink()) or (target.is_file() and not target.is_symlink()):
            target.write_text(json.dumps(draw(JSON_VALUES)))     # (never into a FIFO an earlier draw made)


def check_checkpoint(draw) -> None:
    source = draw(st.sampled_from(SOURCES))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("expected.safetensors"))
        for _ in range(draw(st.integers(1, 2))):
            mutate_folder(folder, source, draw)
        try:
            model = minikv.load(folder)
            if hasattr(model, "encode"):          # an encoder-decoder: the source is the prompt
                model.generate([[0, 1, 2]], max_new_tokens=2)
            else:
                model.forward(np.array([[0, 1, 2]]))
            if getattr(model, "tokenizer", None) is not None and not hasattr(model, "encode"):
                model.generate("hi", max_new_tokens=2)
                model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
            OUTCOMES["loaded and ran"] = OUTCOMES.get("loaded and ran", 0) + 1
        except MinikvError as exc:
            OUTCOMES[type(exc).__name__] = OUTCOMES.get(type(exc).__name__, 0) + 1


# ---------------------------------------------------------------- saved caches

_MODEL = None


def model():
    global _MODEL
    if _MODEL is None:
        _MODEL = minikv.load(SOURCES[0], dtype="float32")
    return _MODEL


def mutate_cache_file(path: Path, draw) -> None:
    how = draw(st.sampled_from(["meta", "tensor", "lengths", "block_table", "drop", "header"]))
    if how == "header":
        path.write_bytes(mutate_header(path.read_bytes(), draw))
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:  # noqa: BLE001 (an earlier mutation broke the file: nothing more to edit)
        return
    if not tensors:
        return
    if how == "meta":
        key = draw(st.sampled_from(sorted(meta) + ["extra"]))
        value = draw(st.one_of(JSON_VALUES.map(json.dumps), HUGE_INTS.map(str),
                               st.sampled_from(["static", "paged", "sliding", "concat", "float16", "int8", "{}",
                                                '{"block_size": 1}', '{"window": 3}', '{"num_blocks": 1}'])))
        meta[key] = value
    elif how == "lengths":
        tensors["lengths"] = np.array(draw(st.lists(st.one_of(HUGE_INTS.filter(lambda v: -2**63 <= v < 2**63),
                                                              st.integers(-3, 40)), max_size=3)), dtype=np.int64)
    elif how == "block_table" and "block_table" in tensors:
        table = tensors["block_table"].copy()
        index = tuple(draw(st.integers(0, n - 1)) for n in table.shape)
        table[index] = draw(st.integers(-3, 40))
        tensors["block_table"] = table
    elif how == "drop":
        del tensors[draw(st.sampled_from(sorted(tensors)))]
    else:
        name = draw(st.sampled_from(sorted(tensors)))
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8]))
        tensors[name] = np.zeros(shape, dtype=dtype) if draw(st.booleans()) else tensors[name].astype(dtype)
    save_file(tensors, str(path), metadata=meta)


def check_cache(draw) -> None:
    m = model()
    kind = draw(st.sampled_from(["concat", "static", "paged", "sliding"]))
    batch = draw(st.integers(1, 2))
    options = {"paged": {"block_size": 4}, "sliding": {"window": 6}}.get(kind, {})
    cache = m.new_cache(kind, batch_size=batch, max_seq_len=24, **options)
    m.forward(np.arange(5 * batch).reshape(batch, 5) % m.config.vocab_size, cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        cache.save(path)
        for _ in range(draw(st.integers(1, 2))):
            mutate_cache_file(path, draw)
        try:
            loaded = minikv.load_cache(path)
            prompts = [[1, 2]] * loaded.batch_size
            m.generate(prompts, max_new_tokens=3, cache=loaded, stop_tokens=[])
            OUTCOMES["loaded and ran"] = OUTCOMES.get("loaded and ran", 0) + 1
        except MinikvError as exc:
            OUTCOMES[type(exc).__name__] = OUTCOMES.get(type(exc).__name__, 0) + 1


TARGETS = {"checkpoint": check_checkpoint, "cache": check_cache}
OUTCOMES: dict[str, int] = {}


def main(argv) -> int:
    target, examples = argv[0], int(argv[1]) if len(argv) > 1 else 60
    fixed = len(argv) < 3 or argv[2] != "random"      # "random": explore beyond the CI's fixed examples

    # No shrinking: the first failing example is reported as found (shrinking a crash under a memory
    # cap can take minutes).
    @settings(max_examples=examples, deadline=None, database=None, derandomize=fixed,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        TARGETS[target](data.draw)

    run()
    print(f"{target}: {examples} examples, every one a success or a MinikvError; outcomes {OUTCOMES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
