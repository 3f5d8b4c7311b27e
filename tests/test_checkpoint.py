"""Loading and saving Hugging Face checkpoint folders: every way a folder can be wrong is a named error.

What is proven here
-------------------
* Each broken checkpoint is a CheckpointError naming the tensor or file and what was expected: a
  missing tensor, an unexpected one, a wrong shape, a float8, integer or other unreadable dtype, NaN/inf weights
  (also float64 values that overflow float32), a truncated file, a corrupt header, no
  model.safetensors at all, a sharded index naming a missing shard or a malformed index, a tensor
  present in two shards.
* Pickle is never executed: a folder holding only pytorch_model.bin is refused, and a .bin whose
  unpickling would create a marker file leaves no marker.
* A sharded checkpoint (a fixture split into two shards + index) loads and gives the same logits.
* save_checkpoint round trip: save then load gives identical weights and logits (float32 and float64).
* GPT-2's Conv1D (in, out) layout and fused c_attn are handled in the table: weights_to_hf(weights_from_hf(file))
  gives back the file's tensors bit for bit, and the minikv q weight is the transposed first block of c_attn.
* Weights are converted to the requested dtype at load: every canonical and prepared weight has it.
* bfloat16 and float16 files load exactly: bf16 -> float32 is bit-exact for all 65536 patterns (against
  ml_dtypes), and a checkpoint re-saved in bf16/f16 gives the weights and logits of its rounded values.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minikv
from minikv.checkpoint import (bfloat16_to_float32, expected_shapes, load_checkpoint, read_safetensors, tensor_table,
                               weights_from_hf, weights_to_hf)
from minikv.config import ModelConfig
from minikv.errors import CheckpointError, ConfigError

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = ["llama_gqa", "llama_mqa_tied", "qwen2_bias", "mistral", "mistral_window", "gpt2"]
IDS = np.array([[0, 5, 9, 3, 1, 7], [2, 2, 8, 6, 4, 0]])


def copy_fixture(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE_ROOT / name / file, folder / file)
    return folder


def rewrite_tensors(folder: Path, change) -> None:
    """Load the folder's model.safetensors, let change(tensors) edit the dict, write it back."""
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def load_error(folder: Path, dtype="float32") -> str:
    with pytest.raises(CheckpointError) as info:
        minikv.load(folder, dtype=dtype)
    return str(info.value)


# ------------------------------------------------------------------ tensors that disagree with the config


def test_missing_tensor(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    message = load_error(folder)
    assert "missing tensor 'model.layers.1.mlp.down_proj.weight'" in message
    assert "(32, 64)" in message  # the expected shape (hidden, intermediate)


def test_missing_bias_of_qwen2(tmp_path):
    folder = copy_fixture("qwen2_bias", tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    assert "model.layers.0.self_attn.k_proj.bias" in load_error(folder)


def test_unexpected_tensor(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    message = load_error(folder)
    assert "unexpected tensor" in message and "model.layers.0.self_attn.q_norm.weight" in message


def test_extra_layer_is_unexpected(tmp_path):
    """A config that says 2 layers with a file holding 3: the third layer's tensors are unexpected."""
    folder = copy_fixture("llama_gqa", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"model.layers.2.input_layernorm.weight": np.ones(32, np.float32)}))
    assert "model.layers.2.input_layernorm.weight" in load_error(folder)


def test_wrong_shape(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    # k_proj for 4 kv heads while the config says 2: (32, 32) instead of (16, 32)
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
    message = load_error(folder)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "(32, 32)" in message and "(16, 32)" in message


def test_wrong_shape_of_a_transposed_gpt2_weight(tmp_path):
    folder = copy_fixture("gpt2", tmp_path)
    # Stored as PyTorch Linear (out, in) = (96, 32) instead of Conv1D's (in, out) = (32, 96)
    rewrite_tensors(folder, lambda t: t.update({"transformer.h.0.attn.c_attn.weight":
                                                np.ascontiguousarray(t["transformer.h.0.attn.c_attn.weight"].T)}))
    message = load_error(folder)
    assert "transformer.h.0.attn.c_attn.weight" in message and "(96, 32)" in message and "(32, 96)" in message


def test_integer_tensor_is_refused(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}))
    message = load_error(folder)
    assert "model.norm.weight" in message and "int32" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, bad):
    folder = copy_fixture("llama_gqa", tmp_path)

    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 5] = bad

    rewrite_tensors(folder, poison)
    message = load_error(folder)
    assert "model.layers.0.mlp.up_proj.weight" in message and "NaN or infinite" in message


def test_float64_value_overflowing_float32_is_refused(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)

    def widen(t):
        for name in t:
            t[name] = t[name].astype(np.float64)
        t["model.embed_tokens.weight"][0, 0] = 1e300

    rewrite_tensors(folder, widen)
    assert minikv.load(folder, dtype="float64").weights["embed.weight"][0, 0] == 1e300
    message = load_error(folder, dtype="float32")
    assert "model.embed_tokens.weight" in message and "float32" in message


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """Write the raw format (8-byte header length, JSON header, data) for dtypes safetensors' NumPy API
    cannot write (BF16, F8_*): tensors maps name -> (safetensors dtype, shape, little-endian bytes)."""
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(payload)]}
        data, offset = data + payload, offset + len(payload)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def rewrite_as(folder: Path, file_dtype: str) -> dict[str, np.ndarray]:
    """Re-save the folder's weights as bfloat16 or float16 (rounded to nearest even by ml_dtypes / NumPy);
    return the float64 values the file now holds, computed independently of minikv's reader."""
    tensors = load_file(str(folder / "model.safetensors"))
    stored, exact = {}, {}
    for name, tensor in tensors.items():
        low = tensor.astype(ml_dtypes.bfloat16 if file_dtype == "BF16" else np.float16)
        stored[name] = (file_dtype, tensor.shape, low.tobytes())
        exact[name] = low.astype(np.float64)
    write_raw_safetensors(folder / "model.safetensors", stored)
    return exact


@pytest.mark.parametrize("file_dtype", ["BF16", "F16"])
@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_bfloat16_and_float16_checkpoints_load_exactly(tmp_path, name, file_dtype):
    folder = copy_fixture(name, tmp_path)
    exact = rewrite_as(folder, file_dtype)
    for dtype in ("float32", "float64"):
        config, weights = load_checkpoint(folder, dtype=dtype)
        # The same translation applied to the independently converted values: identical bits.
        expected = weights_from_hf(exact, config, dtype=dtype)
        assert weights.keys() == expected.keys()
        for tensor_name, tensor in weights.items():
            assert tensor.dtype == np.dtype(dtype) and tensor.flags.c_contiguous
            assert np.array_equal(tensor, expected[tensor_name]), tensor_name
    # And the model runs on them: logits from the bf16/f16 file equal a model built from the exact values.
    model = minikv.load(folder, dtype="float64")
    reference = minikv.Transformer(model.config, weights_from_hf(exact, model.config, dtype="float64"), dtype="float64")
    assert np.array_equal(model.forward(IDS), reference.forward(IDS))


@pytest.mark.parametrize("stored, named", [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                           ("I8", "int8"), ("C64", "complex64")])
def test_float8_and_other_dtypes_are_refused_naming_tensor_and_dtype(tmp_path, stored, named):
    folder = copy_fixture("llama_gqa", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    raw = {n: ("F32", t.shape, t.tobytes()) for n, t in tensors.items()}
    itemsize = 8 if stored == "C64" else 1
    raw["model.norm.weight"] = (stored, (32,), bytes(32 * itemsize))
    write_raw_safetensors(folder / "model.safetensors", raw)
    message = load_error(folder)
    assert "model.norm.weight" in message and stored in message and named in message


def test_bfloat16_to_float32_is_exact_for_every_bit_pattern():
    """All 65536 patterns, compared bit for bit with ml_dtypes (NaN payloads and signed zeros included)."""
    bits = np.arange(2 ** 16, dtype=np.uint16)
    ours = bfloat16_to_float32(bits)
    theirs = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # A deliberately broken variant (truncating float32 -> bf16 -> float32 the other way round) differs.
    assert not np.array_equal((bits.astype(np.uint32) << 15).view(np.float32).view(np.uint32), theirs.view(np.uint32))


@settings(max_examples=25, deadline=None)
@given(patterns=st.lists(st.integers(0, 2 ** 16 - 1), min_size=1, max_size=64), dtype=st.sampled_from(["float32", "float64"]))
def test_bfloat16_file_reads_exactly_through_the_reader(tmp_path_factory, patterns, dtype):
    """Arbitrary bf16 bit patterns (inf and NaN included) written to a file come back as ml_dtypes reads them."""
    bits = np.array(patterns, dtype=np.uint16)
    path = tmp_path_factory.mktemp("bf16") / "t.safetensors"
    write_raw_safetensors(path, {"t": ("BF16", bits.shape, bits.astype("<u2").tobytes())})
    ours = read_safetensors(path, dtype=dtype)["t"]
    theirs = bits.view(ml_dtypes.bfloat16).astype(np.float32).astype(dtype)
    assert ours.dtype == np.dtype(dtype)
    assert np.array_equal(ours, theirs, equal_nan=True)
    assert np.array_equal(np.signbit(ours), np.signbit(theirs))


# ------------------------------------------------------------------ broken files and folders


def test_truncated_file(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = load_error(folder)
    assert str(folder / "model.safetensors") in message and "truncated or corrupt" in message


@pytest.mark.parametrize("garbage", [b"\xff" * 300, b"not a safetensors file at all", b"",
                                     (40).to_bytes(8, "little") + b"{this is not json" + b" " * 23])
def test_corrupt_header(tmp_path, garbage):
    folder = copy_fixture("llama_gqa", tmp_path)
    (folder / "model.safetensors").write_bytes(garbage)
    assert str(folder / "model.safetensors") in load_error(folder)


def test_missing_weights_file(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    (folder / "model.safetensors").unlink()
    message = load_error(folder)
    assert "model.safetensors" in message and str(folder) in message


def test_missing_config_is_named(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        minikv.load(folder)


def test_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        minikv.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a folder"):
        minikv.load(FIXTURE_ROOT / "llama_gqa" / "model.safetensors")


class _TouchOnUnpickle:
    """Unpickling this creates a marker file: the proof that nothing was unpickled is its absence."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("content", ["junk", "pickle"])
def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, content):
    folder = copy_fixture("llama_gqa", tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled.marker"
    data = b"\x80\x04junk that is not a pickle" if content == "junk" else pickle.dumps(_TouchOnUnpickle(marker))
    (folder / "pytorch_model.bin").write_bytes(data)
    message = load_error(folder)
    assert "pickle" in message and "safetensors" in message
    assert not marker.exists()


# ------------------------------------------------------------------ sharded checkpoints


def shard(folder: Path, split_after: int) -> dict[str, str]:
    """Split model.safetensors into two shards and write the index; return the weight map."""
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:split_after],
             "model-00002-of-00002.safetensors": names[split_after:]}
    weight_map = {}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_sharded_checkpoint_gives_the_same_logits(tmp_path, name):
    folder = copy_fixture(name, tmp_path)
    n_tensors = len(load_file(str(folder / "model.safetensors")))
    shard(folder, n_tensors // 2)
    assert not (folder / "model.safetensors").exists()
    whole = minikv.load(FIXTURE_ROOT / name, dtype="float64")
    sharded = minikv.load(folder, dtype="float64")
    assert sharded.weights.keys() == whole.weights.keys()
    for tensor_name in whole.weights:
        assert np.array_equal(sharded.weights[tensor_name], whole.weights[tensor_name]), tensor_name
    assert np.array_equal(sharded.forward(IDS), whole.forward(IDS))


def test_index_naming_a_missing_shard(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    shard(folder, 5)
    (folder / "model-00002-of-00002.safetensors").unlink()
    message = load_error(folder)
    assert "model-00002-of-00002.safetensors" in message and "model.safetensors.index.json" in message


@pytest.mark.parametrize("index", ['{"weight_map": ', '{"metadata": {}}', '{"weight_map": ["a", "b"]}',
                                   '{"weight_map": {"model.norm.weight": 3}}'])
def test_malformed_index(tmp_path, index):
    folder = copy_fixture("llama_gqa", tmp_path)
    shard(folder, 5)
    (folder / "model.safetensors.index.json").write_text(index)
    assert "model.safetensors.index.json" in load_error(folder)


def test_tensor_in_two_shards_is_refused(tmp_path):
    folder = copy_fixture("llama_gqa", tmp_path)
    shard(folder, 5)
    first = load_file(str(folder / "model-00001-of-00002.safetensors"))
    second = load_file(str(folder / "model-00002-of-00002.safetensors"))
    duplicated = sorted(second)[0]
    first[duplicated] = second[duplicated] * 2
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    message = load_error(folder)
    assert duplicated in message and "model-00001-of-00002.safetensors" in message


# ------------------------------------------------------------------ saving


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", FIXTURES)
def test_save_then_load_gives_identical_weights_and_logits(tmp_path, name, dtype):
    model = minikv.load(FIXTURE_ROOT / name, dtype=dtype)
    saved = model.save(tmp_path / "saved")
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    again = minikv.load(saved, dtype=dtype)
    assert again.config == model.config
    assert again.weights.keys() == model.weights.keys()
    for tensor_name, weight in model.weights.items():
        assert again.weights[tensor_name].dtype == weight.dtype
        assert np.array_equal(again.weights[tensor_name], weight), tensor_name
    assert np.array_equal(again.forward(IDS), model.forward(IDS))


@pytest.mark.parametrize("name", FIXTURES)
def test_saved_file_has_the_hf_names_and_layouts(tmp_path, name):
    """What save writes is what Hugging Face wrote: same names, shapes and values (float32 fixtures)."""
    model = minikv.load(FIXTURE_ROOT / name, dtype="float32")
    model.save(tmp_path / "saved")
    original = load_file(str(FIXTURE_ROOT / name / "model.safetensors"))
    written = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert written.keys() == original.keys()
    for tensor_name in original:
        assert np.array_equal(written[tensor_name], original[tensor_name]), tensor_name


def test_save_in_another_dtype(tmp_path):
    model = minikv.load(FIXTURE_ROOT / "llama_gqa", dtype="float32")
    model.save(tmp_path / "half", dtype="float16")
    written = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {t.dtype for t in written.values()} == {np.dtype(np.float16)}
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "float16"
    again = minikv.load(tmp_path / "half", dtype="float32")
    assert all(w.dtype == np.float32 for w in again.weights.values())


def test_interleaved_weights_cannot_be_saved_as_hf(tmp_path):
    model = minikv.load(FIXTURE_ROOT / "llama_gqa", dtype="float64").with_rope_convention("interleaved")
    with pytest.raises(ConfigError, match="rope_convention"):
        model.save(tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_gpt2_conv1d_round_trip_through_the_table():
    config = ModelConfig.from_json(FIXTURE_ROOT / "gpt2" / "config.json")
    raw = read_safetensors(FIXTURE_ROOT / "gpt2" / "model.safetensors")
    file_dtype = raw["transformer.wte.weight"].dtype
    weights = weights_from_hf(raw, config, dtype=file_dtype)
    # Conv1D stores (in, out): minikv's q weight is the transposed first third of c_attn, as (out, in).
    d = config.hidden_size
    c_attn = raw["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (d, 3 * d)
    assert np.array_equal(weights["layers.0.attn.q.weight"], c_attn[:, :d].T)
    assert np.array_equal(weights["layers.0.attn.v.weight"], c_attn[:, 2 * d:].T)
    assert np.array_equal(weights["layers.0.mlp.up.weight"], raw["transformer.h.0.mlp.c_fc.weight"].T)
    back = weights_to_hf(weights, config)
    assert back.keys() == raw.keys()
    for name in raw:
        assert back[name].shape == raw[name].shape and np.array_equal(back[name], raw[name]), name


def test_gpt2_names_without_the_transformer_prefix_load(tmp_path):
    """OpenAI's original GPT-2 exports omit "transformer."; the loader accepts both."""
    folder = copy_fixture("gpt2", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
    assert np.array_equal(minikv.load(folder, dtype="float64").forward(IDS),
                          minikv.load(FIXTURE_ROOT / "gpt2", dtype="float64").forward(IDS))


def test_tied_checkpoint_with_a_stored_lm_head_is_accepted(tmp_path):
    """Some exporters store lm_head.weight even when it is tied; transformers ties it to the embedding."""
    folder = copy_fixture("llama_mqa_tied", tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert np.array_equal(minikv.load(folder, dtype="float64").forward(IDS),
                          minikv.load(FIXTURE_ROOT / "llama_mqa_tied", dtype="float64").forward(IDS))


def test_every_table_row_has_the_shape_the_config_implies():
    for name in FIXTURES:
        config = ModelConfig.from_json(FIXTURE_ROOT / name / "config.json")
        raw = read_safetensors(FIXTURE_ROOT / name / "model.safetensors")
        table = tensor_table(config)
        assert {row.hf for row in table} == set(raw), name
        ours = [n for row in table for n in row.ours]
        assert sorted(ours) == sorted(expected_shapes(config)), name


# ------------------------------------------------------------------ dtype at load


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias", "gpt2"])
def test_weights_are_converted_once_to_the_requested_dtype(name, dtype):
    config, weights = load_checkpoint(FIXTURE_ROOT / name, dtype=dtype)
    assert all(w.dtype == np.dtype(dtype) and w.flags.c_contiguous for w in weights.values())
    model = minikv.load(FIXTURE_ROOT / name, dtype=dtype)
    assert model.dtype == np.dtype(dtype)
    assert all(w.dtype == np.dtype(dtype) for w in model.weights.values())
    # What the forward pass multiplies by: the prepared (fused, transposed) arrays too.
    prepared = [model.embed, model.lm_head, model.final_norm]
    for layer in model.layers:
        prepared += [v for v in vars(layer).values() if v is not None]
    if config.uses_rope:
        prepared += [model.rope_cos, model.rope_sin]
    assert all(np.asarray(a).dtype == np.dtype(dtype) for a in prepared)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias", "gpt2"])
def test_the_model_holds_each_weight_once(name):
    """On the host the canonical weights are views of the prepared (fused, transposed) arrays, with the
    values read from the file: loading a checkpoint does not leave two copies of it in memory."""
    model = minikv.load(FIXTURE_ROOT / name, dtype="float64")
    _, fresh = load_checkpoint(FIXTURE_ROOT / name, dtype="float64")
    prepared = [a for a in (model.embed, model.pos_embed, model.lm_head, model.final_norm, model.final_norm_bias)
                if a is not None] + [a for layer in model.layers for a in vars(layer).values()
                                              if a is not None]
    for tensor_name, tensor in model.weights.items():
        assert np.array_equal(tensor, fresh[tensor_name]), tensor_name
        assert any(np.shares_memory(tensor, array) for array in prepared), f"{tensor_name} is a second copy"
