"""Hostile files and bad arguments (issue 18): each is a named MinikvError, fast, and changes nothing.

What is proven here
-------------------
* The loader opens regular files only: a FIFO as config, weights or shard, a config that is a symlink
  to /dev/zero, a directory where a file belongs are a ConfigError/CheckpointError within a second
  (a FIFO would otherwise block forever: each such test runs under an alarm that fails it instead).
  Symlinks to regular files (the Hugging Face cache's snapshot -> blobs layout) still load.
* JSON is read with a size cap; invalid UTF-8, deep nesting, and absurd numbers are named errors.
* Sizes are checked before any per-layer work: num_hidden_layers=10**12, n_layer=2**64 and
  max_position_embeddings=10**12 are ConfigErrors; 10**6 layers with two layers of tensors is a
  CheckpointError before any table of 10**6 rows is built.
* Shard names outside the folder (absolute, '..') are refused lexically, even when the file exists.
* eos ids beyond int64, a float8 tensor, a corrupt tokenizer.json: named errors; the CLI prints one
  line and no traceback for them and for --seed -1.
* generate refuses a bad seed, rng, stop token, prompt id, max_new_tokens, cache option before it
  writes to any cache: a caller's cache is bit for bit what it was.
* A stream re-checks its cache when iterated and at every step.
* load(dtype=None), saving over a file: named errors; saving into a missing folder creates it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minikv
from minikv.errors import (CacheMismatchError, CacheOverflowError, CheckpointError, ConfigError, InvalidInputError,
                           MinikvError, SequenceTooLongError, TokenizerError)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_ROOT = ROOT / "tests" / "fixtures" / "hf"
BUNDLED = ROOT / "minikv" / "data" / "tiny-fortunes"


def copy_checkpoint(source: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(source / file, folder / file)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_refused(folder: Path, error=CheckpointError, match=None) -> str:
    with within(10), pytest.raises(error, match=match) as info:
        minikv.load(folder)
    return str(info.value)


@pytest.fixture(scope="module")
def model():
    return minikv.load(FIXTURE_ROOT / "llama_gqa", dtype="float64")


@pytest.fixture(scope="module")
def bundled():
    return minikv.load()


# ---------------------------------------------------------------- files that are not regular files


def test_fifo_as_config_is_a_config_error_not_a_hang(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    assert "FIFO" in load_refused(folder, ConfigError)


def test_fifo_as_weights_is_a_checkpoint_error_not_a_hang(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    assert "FIFO" in load_refused(folder)


def test_fifo_as_shard_is_a_checkpoint_error_not_a_hang(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "shard.safetensors" for n in names}}))
    assert "FIFO" in load_refused(folder)


def test_config_linked_to_dev_zero_is_refused_at_once(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    assert "device" in load_refused(folder, ConfigError)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_directory_where_a_file_belongs_is_a_named_error(tmp_path, name):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / name).unlink()
    (folder / name).mkdir()
    assert "directory" in load_refused(folder, (ConfigError, CheckpointError))


def test_directory_as_shard_is_a_checkpoint_error(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors").unlink()
    (folder / "shard").mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "shard" for n in names}}))
    assert "directory" in load_refused(folder)


def test_symlinks_into_a_blob_store_still_load(tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/config.json -> ../../blobs/<hash>."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(("config.json", "model.safetensors")):
        shutil.copy(FIXTURE_ROOT / "llama_gqa" / file, blobs / f"hash{i}")
        (snapshot / file).symlink_to(Path("..") / ".." / "blobs" / f"hash{i}")
    linked = minikv.load(snapshot, dtype="float64")
    plain = minikv.load(FIXTURE_ROOT / "llama_gqa", dtype="float64")
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(linked.forward(ids), plain.forward(ids))


# ---------------------------------------------------------------- JSON: size, encoding, nesting


def test_config_larger_than_the_json_cap_is_refused_without_reading_it_all(tmp_path):
    from minikv.validate import JSON_MAX_BYTES

    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    with open(folder / "config.json", "r+b") as handle:    # sparse: no disk, no time
        handle.truncate(JSON_MAX_BYTES + 10)
    assert "larger than" in load_refused(folder, ConfigError)


def test_invalid_utf8_config_is_a_config_error(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "config.json").write_bytes(b'{"model_type": "ll\xff\xfeama"}')
    assert "UTF-8" in load_refused(folder, ConfigError)


@pytest.mark.parametrize("file, error", [("config.json", ConfigError), ("model.safetensors.index.json", CheckpointError)])
def test_deeply_nested_json_is_a_named_error_not_a_recursion_error(tmp_path, file, error):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    if file != "config.json":
        (folder / "model.safetensors").unlink()
    (folder / file).write_text("[" * 200_000 + "]" * 200_000)
    assert "nested too deeply" in load_refused(folder, error)


def test_an_integer_of_ten_thousand_digits_is_a_config_error(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    text = (folder / "config.json").read_text().replace('"vocab_size": 97', '"vocab_size": ' + "9" * 10_000)
    (folder / "config.json").write_text(text)
    load_refused(folder, ConfigError)


# ---------------------------------------------------------------- sizes before per-layer work


@pytest.mark.parametrize("source, field, value", [
    ("llama_gqa", "num_hidden_layers", 10**12),
    ("gpt2", "n_layer", 2**64),
    ("llama_gqa", "max_position_embeddings", 10**12),
    ("llama_gqa", "vocab_size", 2**40),
])
def test_sizes_that_cannot_be_represented_are_config_errors(tmp_path, source, field, value):
    folder = copy_checkpoint(FIXTURE_ROOT / source, tmp_path)
    edit_config(folder, **{field: value})
    assert field in load_refused(folder, ConfigError)


@pytest.mark.parametrize("source, field", [("llama_gqa", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_a_million_layers_fail_on_the_tensor_count_before_any_table(tmp_path, source, field, monkeypatch):
    import minikv.checkpoint as checkpoint

    def no_table(config):
        raise AssertionError("a per-layer table was built before the layer count was compared with the files")

    monkeypatch.setattr(checkpoint, "tensor_table", no_table)
    monkeypatch.setattr(checkpoint, "expected_shapes", no_table)
    folder = copy_checkpoint(FIXTURE_ROOT / source, tmp_path)
    edit_config(folder, **{field: 10**6})
    assert "1000000 layers" in load_refused(folder)


@pytest.mark.parametrize("changes", [
    {"layer_types": [None, 18]},          # found by the fuzz: a TypeError from sorted() inside the reader
    {"layer_types": 3},
    {"rope_scaling": [1, 2]},
    {"hidden_act": ["silu"]},
    {"num_key_value_heads": [2]},
    {"rms_norm_eps": {"a": 1}},
])
def test_config_values_of_the_wrong_type_are_config_errors(tmp_path, changes):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    edit_config(folder, **changes)
    load_refused(folder, ConfigError)


@pytest.mark.parametrize("eos", [2**63, 2**64 + 1, [1, 2**70]])
def test_eos_ids_beyond_int64_are_config_errors(tmp_path, eos):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    edit_config(folder, eos_token_id=eos)
    assert "eos_token_id" in load_refused(folder, ConfigError)


# ---------------------------------------------------------------- shards and tensors


@pytest.mark.parametrize("shard", ["/abs/shard.safetensors", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors", "C:\\shard.safetensors"])
def test_shard_names_outside_the_folder_are_refused_even_when_the_file_exists(tmp_path, shard):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    names = list(load_file(str(folder / "model.safetensors")))
    shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")   # reachable by '..'
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    assert "outside the checkpoint folder" in load_refused(folder)


def test_a_shard_in_a_subfolder_still_loads(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "sub").mkdir()
    (folder / "model.safetensors").rename(folder / "sub" / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "sub/shard.safetensors" for n in names}}))
    assert minikv.load(folder).config.n_layers == 2


def test_a_float8_tensor_is_a_checkpoint_error(tmp_path):
    # Written raw (8-byte header length, JSON header, data): importing ml_dtypes to write it would
    # register its dtypes with NumPy for the rest of the test session.
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    header = json.dumps({"model.norm.weight": {"dtype": "F8_E4M3", "shape": [32], "data_offsets": [0, 32]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(32))
    assert "model.safetensors" in load_refused(folder)


# ---------------------------------------------------------------- tokenizer and CLI


def cli(*args):
    return subprocess.run([sys.executable, "-m", "minikv", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b'{"model": {"type": "Nonsense"}}'])
def test_corrupt_tokenizer_json_is_a_tokenizer_error(tmp_path, content):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "tokenizer.json").write_bytes(content)
    message = load_refused(folder, TokenizerError)
    assert "tokenizer.json" in message
    assert issubclass(TokenizerError, CheckpointError)


def test_fifo_as_tokenizer_json_is_a_tokenizer_error(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    os.mkfifo(folder / "tokenizer.json")
    assert "FIFO" in load_refused(folder, TokenizerError)


def test_cli_info_on_a_corrupt_tokenizer_prints_one_line_not_a_traceback(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "tokenizer.json").write_text("{broken")
    result = cli("info", "--model", str(folder))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "TokenizerError" in result.stderr


@pytest.mark.parametrize("seed", ["-1", "abc", "1.5"])
def test_cli_bad_seed_is_a_usage_error_not_a_traceback(seed):
    result = cli("generate", "hi", "--seed", seed, "--max-new-tokens", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--seed" in result.stderr


# ---------------------------------------------------------------- generate: every argument before any write


def assert_cache_unchanged(cache, before):
    assert cache.lengths.tolist() == before["lengths"]
    for i in range(cache.n_layers):
        np.testing.assert_array_equal(cache.k[i], before["k"][i])
        np.testing.assert_array_equal(cache.v[i], before["v"][i])


def snapshot(cache):
    return {"lengths": cache.lengths.tolist(), "k": [k.copy() for k in cache.k], "v": [v.copy() for v in cache.v]}


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"rng": 5, "temperature": 1.0}, InvalidInputError, "rng"),
    ({"seed": "abc", "temperature": 1.0}, InvalidInputError, "seed"),
    ({"seed": 1.5, "temperature": 1.0}, InvalidInputError, "seed"),
    ({"seed": -1, "temperature": 1.0}, InvalidInputError, "seed"),
    ({"seed": True}, InvalidInputError, "seed"),
    ({"stop_tokens": [104.9]}, InvalidInputError, "104.9"),
    ({"stop_tokens": ["a"]}, InvalidInputError, "'a'"),
    ({"stop_tokens": [True]}, InvalidInputError, "True"),
    ({"stop_tokens": [2**70]}, InvalidInputError, "out of range"),
    ({"stop_tokens": 3}, InvalidInputError, "stop_tokens"),
    ({"max_new_tokens": 2**70}, SequenceTooLongError, "max_new_tokens"),
    ({"max_new_tokens": True}, InvalidInputError, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, InvalidInputError, "max_new_tokens"),
    ({"prefill_chunk": True}, InvalidInputError, "prefill_chunk"),
    ({"max_seq_len": 100}, ConfigError, "max_seq_len"),      # with a cache object: it would be ignored
])
def test_bad_generate_arguments_fail_before_the_callers_cache_is_touched(model, kwargs, error, needle):
    cache = model.new_cache("static", max_seq_len=32)
    model.forward(np.array([[1, 2, 3]]), cache)
    before = snapshot(cache)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=needle):
        model.generate([4, 5, 6], cache=cache, **kwargs)
    assert_cache_unchanged(cache, before)


@pytest.mark.parametrize("prompt", [[1.5, 2.0], [[1.0, 2.0]], [True, False], [["a", "b"]], np.array([1.5, 2.0]),
                                    [[1, 2], [3, 4.0]]])
def test_prompt_ids_that_are_not_integers_are_refused_like_forward_refuses_them(model, prompt):
    with pytest.raises(InvalidInputError, match="integer"):
        model.generate(prompt, max_new_tokens=2)
    if not isinstance(prompt[0], list) or len(prompt) == 1:       # forward takes one rectangular array
        with pytest.raises(InvalidInputError, match="integer"):
            model.forward(np.asarray(prompt))


@pytest.mark.parametrize("kwargs, needle", [
    ({"cache": "sliding", "window": "a"}, "window"),
    ({"cache": "paged", "block_size": 0}, "block_size"),
])
def test_bad_cache_options_are_config_errors(model, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        model.generate([1, 2], max_new_tokens=2, **kwargs)


def test_stream_rechecks_room_when_iterated(model):
    cache = model.new_cache("static", max_seq_len=10)
    stream = model.stream([1, 2, 3], max_new_tokens=5, cache=cache, stop_tokens=[])   # 3 + 4 <= 10: fits now
    model.forward(np.array([[7, 7, 7, 7]]), cache)                                     # 4 + 3 + 4 > 10
    with pytest.raises(CacheOverflowError, match="max_seq_len"):
        next(iter(stream))
    assert cache.lengths.tolist() == [4]


def test_stream_checks_its_cache_at_every_step(model):
    cache = model.new_cache("static", max_seq_len=40)
    events = iter(model.stream([1, 2, 3], max_new_tokens=6, cache=cache, stop_tokens=[]))
    next(events)
    model.forward(np.array([[9]]), cache)          # someone else writes between two tokens
    with pytest.raises(CacheMismatchError, match="another call"):
        next(events)


# ---------------------------------------------------------------- load and save


def test_load_dtype_none_is_refused_not_float64():
    with pytest.raises(ConfigError, match="dtype=None"):
        minikv.load(FIXTURE_ROOT / "llama_gqa", dtype=None)


def test_save_over_an_existing_file_is_a_checkpoint_error(model, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file"):
        model.save(target)
    assert target.read_text() == "keep me"


def test_save_into_a_missing_folder_creates_it(model, tmp_path):
    folder = model.save(tmp_path / "new" / "nested")
    again = minikv.load(folder, dtype="float64")
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(again.forward(ids), model.forward(ids))


def test_every_error_here_is_a_minikv_error():
    for error in (ConfigError, CheckpointError, TokenizerError, InvalidInputError, CacheOverflowError,
                  CacheMismatchError, SequenceTooLongError):
        assert issubclass(error, MinikvError)


# ---------------------------------------------------------------- saved caches (load_cache checks the whole file)


def saved_cache(model, tmp_path, kind="paged", batch=2, **options):
    options = options or {"paged": {"block_size": 4}, "sliding": {"window": 6}}.get(kind, {})
    cache = model.new_cache(kind, batch_size=batch, max_seq_len=24, **options)
    model.forward(np.arange(6 * batch).reshape(batch, 6), cache)
    return cache.save(tmp_path / f"{kind}.safetensors")


def rewrite_cache(path, change_tensors=None, change_meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        meta = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def set_entry(name, index, value):
    def change(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][index] = value
    return change


@pytest.mark.parametrize("change, needle", [
    (set_entry("block_table", (0, 0), 10**6), "outside the pool"),
    (set_entry("block_table", (1, 0), -7), "outside the pool"),
    (set_entry("block_table", (0, 0), -1), "hole"),                  # a hole before the row's second block
    (set_entry("block_table", (1, 0), 0), "two places"),             # sequence 1 aliases sequence 0's block
    (set_entry("block_table", (0, 1), 0), "two places"),             # aliased within one sequence
    (set_entry("lengths", 0, 9), "holds 2 blocks"),                  # 9 positions need 3 blocks of 4
    (set_entry("lengths", 1, 25), "holds 0..24"),                    # beyond max_seq_len
    (set_entry("lengths", 1, -1), "length -1"),
])
def test_a_saved_paged_cache_with_a_bad_table_or_lengths_is_refused(model, tmp_path, change, needle):
    path = saved_cache(model, tmp_path)
    rewrite_cache(path, change)
    with pytest.raises(CheckpointError, match=needle):
        minikv.load_cache(path)


@pytest.mark.parametrize("kind, meta_change, needle", [
    ("paged", {"extra": json.dumps({"block_size": 8, "num_blocks": 12})}, "shape"),   # block_size disagrees with the pool
    ("paged", {"extra": json.dumps({"block_size": 4})}, "extra"),
    ("static", {"max_seq_len": "99"}, "shape"),
    ("static", {"n_layers": "10000000000000"}, "n_layers"),
    ("static", {"dtype": "int8"}, "dtype"),
    ("sliding", {"extra": json.dumps({"window": 100})}, "window"),
    ("concat", {"extra": "[" * 10_000}, "extra"),
])
def test_cache_metadata_that_disagrees_with_the_tensors_is_refused(model, tmp_path, kind, meta_change, needle):
    path = saved_cache(model, tmp_path, kind)
    rewrite_cache(path, change_meta=lambda meta: meta.update(meta_change))
    with pytest.raises(CheckpointError, match=needle):
        minikv.load_cache(path)


@pytest.mark.parametrize("kind", ["concat", "static", "sliding"])
def test_lengths_beyond_what_the_arrays_hold_are_refused(model, tmp_path, kind):
    path = saved_cache(model, tmp_path, kind)
    rewrite_cache(path, set_entry("lengths", 0, 30 if kind != "concat" else 7))   # concat arrays hold 6
    with pytest.raises(CheckpointError, match="length"):
        minikv.load_cache(path)


def test_cache_tensors_of_the_wrong_dtype_or_shape_are_refused(model, tmp_path):
    path = saved_cache(model, tmp_path, "static")
    rewrite_cache(path, lambda t: t.update({"k.1": t["k.1"].astype(np.float16)}))
    with pytest.raises(CheckpointError, match="dtype"):
        minikv.load_cache(path)
    path = saved_cache(model, tmp_path, "paged")
    rewrite_cache(path, lambda t: t.update({"v.0": t["v.0"][:, :, :2]}))
    with pytest.raises(CheckpointError, match="shape"):
        minikv.load_cache(path)


@pytest.mark.parametrize("kind", ["concat", "static", "paged", "sliding"])
def test_an_untouched_saved_cache_still_loads_and_continues_exactly(model, tmp_path, kind):
    path = saved_cache(model, tmp_path, kind, batch=1)
    loaded = minikv.load_cache(path)
    out = model.generate([[40, 41]], max_new_tokens=3, cache=loaded, stop_tokens=[])
    history = list(range(6)) + [40, 41]
    window = loaded.window if kind == "sliding" else None      # the ring attends to its last 6 positions
    expected = []
    for _ in range(3):
        expected.append(int(np.argmax(model.forward(np.array([history]), window=window)[0, -1])))
        history.append(expected[-1])
    assert out.tokens == [expected]


def test_a_paged_table_outside_the_pool_never_reaches_the_numba_kernel(tmp_path):
    """It segfaulted the process: run in a child so a regression fails this test, not the suite."""
    pytest.importorskip("numba")
    script = f"""
import numpy as np, minikv
from safetensors import safe_open
from safetensors.numpy import save_file
model = minikv.load({str(FIXTURE_ROOT / 'llama_gqa')!r}, backend="numba")
cache = model.new_cache("paged", max_seq_len=32, block_size=4)
model.forward(np.array([[1, 2, 3, 4, 5]]), cache)
path = cache.save({str(tmp_path / 'c.safetensors')!r})
with safe_open(str(path), framework="np") as h:
    meta, tensors = h.metadata(), {{n: h.get_tensor(n) for n in h.keys()}}
tensors["block_table"][0, 1] = 10**6
save_file(tensors, str(path), metadata=meta)
try:
    loaded = minikv.load_cache(path, backend="numba")
    model.generate([[7]], max_new_tokens=2, cache=loaded)
except minikv.CheckpointError as exc:
    print("refused:", exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "outside the pool" in result.stdout


def test_saving_a_cache_into_a_missing_folder_or_onto_a_folder_is_a_checkpoint_error(model, tmp_path):
    cache = model.new_cache("static", max_seq_len=8)
    with pytest.raises(CheckpointError, match="does not exist"):
        cache.save(tmp_path / "missing" / "c.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        cache.save(tmp_path)


def test_a_fifo_as_cache_file_is_refused_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "c.safetensors")
    with within(10), pytest.raises(CheckpointError, match="FIFO"):
        minikv.load_cache(tmp_path / "c.safetensors")


@pytest.mark.parametrize("kind, options", [("static", {}), ("sliding", {}), ("paged", {"block_size": 16})])
def test_a_cache_larger_than_the_machine_is_a_config_error_not_a_memory_error(model, kind, options):
    with pytest.raises(ConfigError, match="max_seq_len"):
        model.new_cache(kind, max_seq_len=10**12, **options)
    with pytest.raises(ConfigError, match="max_seq_len"):
        model.generate([1, 2], max_new_tokens=2, cache=kind, max_seq_len=10**12)


def test_a_bogus_cache_dtype_is_a_config_error(model):
    with pytest.raises(ConfigError, match="bogus"):
        model.generate([1, 2], max_new_tokens=2, cache_dtype="bogus")


# ---------------------------------------------------------------- a property over hostile arguments

HOSTILE = st.sampled_from([None, 0, -1, 1, 2, 3, 2**70, -2**70, 0.5, 1.5, float("nan"), float("inf"), "a", "", True,
                           False, [], [1], [104.9], ["a"], {}, np.int64(2), np.float32(0.5), "prompt_lookup",
                           [[1, 2]], [[1.5, 2]]])
GENERATE_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "rng",
                 "stop_tokens", "prefill_chunk", "max_seq_len", "cache_dtype", "window", "block_size", "num_blocks",
                 "speculative", "num_speculative_tokens", "cached_tokens")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["none", "concat", "static", "paged", "sliding", "bogus", None, 3]),
       args=st.dictionaries(st.sampled_from(GENERATE_ARGS), HOSTILE, max_size=3),
       prompt=st.sampled_from([[1, 2, 3], [[1, 2], [3]], [1.5], [True], "hi", [[]], [200], [-1], np.array([1, 2])]))
def test_hostile_generate_arguments_give_a_result_or_a_minikv_error_and_leave_a_cache_alone(model, kind, args,
                                                                                            prompt):
    """Every combination is a GenerationOutput or a MinikvError; a caller's cache is untouched on failure."""
    try:
        out = model.generate(prompt, cache=kind, **{"max_new_tokens": 2, **args})
        assert all(0 <= t < model.config.vocab_size for row in out.tokens for t in row)
    except MinikvError:
        pass
    cache = model.new_cache("static", batch_size=1, max_seq_len=16)
    model.forward(np.array([[5, 6]]), cache)
    before = snapshot(cache)
    try:
        model.generate([7, 8], cache=cache, **{"max_new_tokens": 2, **{k: v for k, v in args.items()
                                                                        if k not in _CACHE_MAKING}})
        return
    except MinikvError:
        pass
    assert_cache_unchanged(cache, before)


_CACHE_MAKING = ("max_seq_len", "cache_dtype", "window", "block_size", "num_blocks", "speculative",
                 "num_speculative_tokens")


@pytest.mark.parametrize("kind", ["fifo", "dir", "dev_zero", "deep", "bad_utf8", "huge_eos"])
def test_a_hostile_generation_config_is_a_config_error(tmp_path, kind):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    path = folder / "generation_config.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "bad_utf8":
        path.write_bytes(b'{"eos_token_id": "\xff"}')
    else:
        path.write_text(json.dumps({"eos_token_id": 2**64}))
    load_refused(folder, ConfigError)


CHATML = ROOT / "tests" / "fixtures" / "chat" / "chatml"


def copy_chat_checkpoint(tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(CHATML, folder, ignore=shutil.ignore_patterns("expected.json"))
    return folder


@pytest.mark.parametrize("kind", ["fifo", "deep", "bad_utf8", "dir"])
def test_a_hostile_tokenizer_config_is_a_tokenizer_error(tmp_path, kind):
    folder = copy_chat_checkpoint(tmp_path)
    path = folder / "tokenizer_config.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "bad_utf8":
        path.write_bytes(b'{"bos_token": "\xff"}')
    else:
        path.mkdir()
    load_refused(folder, TokenizerError)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json"])
def test_saving_over_a_fifo_is_refused_before_writing_anything(tmp_path, name):
    model = minikv.load(CHATML)
    target = tmp_path / "out"
    target.mkdir()
    os.mkfifo(target / name)
    with within(10), pytest.raises(CheckpointError, match="regular file"):
        model.save(target)
    assert sorted(p.name for p in target.iterdir()) == [name]


@pytest.mark.parametrize("path", [123, b"folder", ["a"], 1.5])
def test_a_path_that_is_not_a_path_is_an_invalid_input_error(path, model, tmp_path):
    with pytest.raises(InvalidInputError, match="must be a path"):
        minikv.load(path)
    with pytest.raises(InvalidInputError, match="must be a path"):
        minikv.load_cache(path)
    with pytest.raises(InvalidInputError, match="must be a path"):
        model.new_cache("static", max_seq_len=4).save(path)
    with pytest.raises(InvalidInputError, match="must be a path"):
        model.save(path)


@pytest.mark.parametrize("kwargs", [{"kind": ["static"]}, {"kind": {}}, {"batch_size": 2**70}, {"max_seq_len": 2**70},
                                    {"kind": "paged", "block_size": 2**70}, {"kind": "paged", "num_blocks": 2**70},
                                    {"kind": "sliding", "window": 2**70, "max_seq_len": 8}])
def test_new_cache_refuses_unrepresentable_options_by_name(model, kwargs):
    try:
        cache = model.new_cache(**kwargs)
    except ConfigError:
        return
    assert kwargs.get("kind") == "sliding" and cache.window == 8      # a window wider than the cache is clamped


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["none", "concat", "static", "paged", "sliding", "bogus", None, 3, ["static"]]),
       args=st.dictionaries(st.sampled_from(["batch_size", "max_seq_len", "dtype", "block_size", "num_blocks",
                                             "window"]), HOSTILE, max_size=3))
def test_hostile_new_cache_arguments_give_a_cache_or_a_minikv_error(model, windowed, kind, args):
    """new_cache("static", block_size=4) was a raw TypeError; any mix of kinds and options is a cache or
    a MinikvError. The fixture with a sliding window also runs it (its window is clamped to the model's)."""
    for m in (model, windowed):
        new_cache_or_minikv_error(m, kind, args)


@pytest.fixture(scope="module")
def windowed():
    return minikv.load(FIXTURE_ROOT / "mistral_window", dtype="float64")


def new_cache_or_minikv_error(model, kind, args):
    try:
        cache = model.new_cache(kind, **args)
    except MinikvError:
        return
    if cache is not None:      # a cache that was made works: one token in, one position held
        model.forward(np.ones((cache.batch_size, 1), dtype=np.int64), cache)
        assert cache.lengths.tolist() == [1] * cache.batch_size


@pytest.mark.parametrize("value", [[], ["numpy"], {}, np.array([1.5])])
def test_a_backend_name_that_is_not_a_string_is_a_config_error(value):
    with pytest.raises(ConfigError, match="backend"):
        minikv.load(FIXTURE_ROOT / "llama_gqa", backend=value)


@pytest.mark.parametrize("value", [0, "static", [], np.int64(2)])
def test_forward_with_a_cache_that_is_not_a_cache_is_an_invalid_input_error(model, value):
    with pytest.raises(InvalidInputError, match="not a KVCache"):
        model.forward(np.array([[1, 2, 3]]), cache=value)


@pytest.mark.parametrize("ids", [["a"], [2**70], [-1], 5, "x", [[1]], [1.5], [True]])
def test_decoding_ids_that_are_not_token_ids_is_an_invalid_input_error(ids):
    tokenizer = minikv.load(CHATML).tokenizer
    with pytest.raises(InvalidInputError):
        tokenizer.decode(ids)


SEQ2SEQ = ROOT / "tests" / "fixtures" / "seq2seq"


@pytest.mark.parametrize("changes, error", [
    ({"num_layers": 10**6}, CheckpointError),           # before a per-layer table of a million rows
    ({"num_layers": 2**64}, ConfigError),
    ({"num_heads": [4]}, ConfigError),
    ({"d_model": "256"}, ConfigError),
])
def test_a_hostile_encoder_decoder_config_is_a_named_error(tmp_path, changes, error):
    folder = tmp_path / "t5"
    shutil.copytree(SEQ2SEQ / "t5_v1_1", folder, ignore=shutil.ignore_patterns("expected.safetensors"))
    edit_config(folder, **changes)
    load_refused(folder, error)


def test_an_encoder_decoder_generation_config_that_is_a_fifo_is_refused_not_a_hang(tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(SEQ2SEQ / "t5_v1_1", folder, ignore=shutil.ignore_patterns("expected.safetensors"))
    (folder / "generation_config.json").unlink()
    os.mkfifo(folder / "generation_config.json")
    assert "FIFO" in load_refused(folder, ConfigError)


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": ["32"], "data_offsets": [0, 128]},          # int("32") would read it
    {"dtype": "F32", "shape": [32.5], "data_offsets": [0, 128]},          # int(32.5) would read 32
    {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]},   # np.prod wraps to 0 bytes
    {"dtype": "F32", "shape": [32], "data_offsets": ["0", 128]},
    {"dtype": ["F32"], "shape": [32], "data_offsets": [0, 128]},
])
def test_a_safetensors_header_with_non_integer_or_overflowing_sizes_is_a_checkpoint_error(tmp_path, entry):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    write_raw_safetensors(folder / "model.safetensors", {"model.norm.weight": entry}, bytes(128))
    assert "model.safetensors" in load_refused(folder)


def test_a_deeply_nested_safetensors_header_is_a_checkpoint_error(tmp_path):
    folder = copy_checkpoint(FIXTURE_ROOT / "llama_gqa", tmp_path)
    (folder / "model.safetensors").write_bytes((200_000).to_bytes(8, "little") + b"[" * 200_000)
    assert "nested too deeply" in load_refused(folder)


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"seed": "a"}, {"seed": 0.5}, {"stop_tokens": 0},
                                    {"stop_tokens": ["x"]}, {"stop_tokens": [104.9]}, {"rng": 3, "temperature": 1.0}])
def test_encoder_decoder_generate_checks_seed_rng_and_stop_tokens_like_generate(kwargs):
    model = minikv.load(SEQ2SEQ / "t5_v1_1")
    with pytest.raises(InvalidInputError):
        model.generate([[1, 2, 3]], max_new_tokens=2, **kwargs)
