"""Encoder-decoder models (T5, BART): conformance with transformers, and the cache properties.

tests/fixtures/seq2seq/<name>/ holds a tiny random checkpoint and what transformers computed for it
in float64 (scripts/make_seq2seq_fixtures.py; these tests need no torch):

    t5_v1_1   gated-GELU FFN, untied lm_head, 2 encoder + 3 decoder layers
    t5_relu   ReLU FFN, tied lm_head with T5's d_model^-0.5 rescale
    bart      learned positions (offset 2), post-LayerNorm, layernorm_embedding, exact GELU,
              scale_embedding, final_logits_bias, forced BOS/EOS

Sources are a ragged batch (20 and 13 real tokens), targets 14 tokens: both longer than T5's
relative_attention_max_distance (8), so the log-spaced and the last buckets are exercised.

Tolerances: float64 against float64 at 1e-10 (round-off here is ~1e-14; a wrong convention moves
logits by 1e-3 .. 1); float32 at 1e-4 relative to the largest logit (transformers' own float32 model
is ~1e-5 away from the reference).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minikv
from minikv.errors import CacheOverflowError, CheckpointError, ConfigError, InvalidInputError
from minikv.seq2seq import CrossAttentionCache, EncoderDecoder, relative_position_bucket

ROOT = Path(__file__).parent / "fixtures" / "seq2seq"
NAMES = ("t5_v1_1", "t5_relu", "bart")
KINDS = ("concat", "static", "paged")
EXACT = 1e-10

_models: dict = {}


def model_for(name: str, dtype: str = "float64") -> EncoderDecoder:
    if (name, dtype) not in _models:
        _models[(name, dtype)] = minikv.load(ROOT / name, dtype=dtype)
    return _models[(name, dtype)]


def expected(name: str) -> dict:
    return load_file(str(ROOT / name / "expected.safetensors"))


def sources_of(e) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(e["input_ids"], e["attention_mask"].sum(axis=1))]


# ------------------------------------------------------------------ conformance with transformers


def test_every_fixture_is_present():
    assert sorted(p.name for p in ROOT.iterdir() if (p / "expected.safetensors").is_file()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_float64_encoder_and_logits_equal_transformers(name):
    model, e = model_for(name), expected(name)
    assert isinstance(model, EncoderDecoder) and model.config.model_type == name.split("_")[0]
    lengths = e["attention_mask"].sum(axis=1)
    states = model.encode(e["input_ids"], lengths)
    for b, n in enumerate(lengths):     # padded rows are garbage in both; only real positions count
        assert np.abs(states[b, :n] - e["encoder_states"][b, :n]).max() < EXACT
    logits = model.forward(e["decoder_ids"], encoder_states=states, encoder_lengths=lengths)
    assert logits.dtype == np.float64
    assert np.abs(logits - e["logits"]).max() < EXACT


@pytest.mark.parametrize("name", NAMES)
def test_float32_stays_float32_and_is_close(name):
    model, e = model_for(name, "float32"), expected(name)
    lengths = e["attention_mask"].sum(axis=1)
    states = model.encode(e["input_ids"], lengths)
    logits = model.forward(e["decoder_ids"], encoder_states=states, encoder_lengths=lengths)
    assert states.dtype == np.float32 and logits.dtype == np.float32
    assert np.abs(logits - e["logits"]).max() < 1e-4 * max(1.0, np.abs(e["logits"]).max())


@pytest.mark.parametrize("kind", ("none",) + KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_greedy_ids_equal_transformers_generate(name, kind):
    model, e = model_for(name), expected(name)
    want = []
    for row in e["generated"]:
        stops = set(model.config.eos_token_ids)
        tokens = []
        for t in row[1:].tolist():          # transformers' output starts with the decoder start token
            if t in stops:
                break
            tokens.append(t)
        want.append(tokens)
    out = model.generate(sources_of(e), max_new_tokens=e["generated"].shape[1] - 1, cache=kind)
    assert out.tokens == want
    assert any(len(t) > 3 for t in want)    # the fixture is not a trivial one


@pytest.mark.parametrize("name", ("t5_v1_1", "t5_relu"))
def test_relative_position_buckets_equal_transformers(name):
    e = expected(name)
    for key, (buckets, distance) in (("small", (8, 8)), ("default", (32, 128))):
        for direction in ("bi", "uni"):
            want = e[f"buckets_{key}_{direction}"]
            span = (len(want) - 1) // 2
            got = relative_position_bucket(np.arange(-span, span + 1), direction == "bi", buckets, distance)
            assert np.array_equal(got, want)


def test_a_missing_relative_bias_or_head_rescale_is_caught():
    """Broken variants: the fixture comparison must see each T5-specific piece."""
    e = expected("t5_relu")
    lengths = e["attention_mask"].sum(axis=1)
    good = model_for("t5_relu")
    weights = dict(good.weights)
    weights["decoder.rel_bias.weight"] = np.zeros_like(weights["decoder.rel_bias.weight"])
    for broken in (EncoderDecoder(good.config, weights, dtype="float64"),
                   EncoderDecoder(good.config.__class__(**{**good.config.__dict__, "scale_decoder_outputs": False}),
                                  good.weights, dtype="float64")):
        states = broken.encode(e["input_ids"], lengths)
        logits = broken.forward(e["decoder_ids"], encoder_states=states, encoder_lengths=lengths)
        assert np.abs(logits - e["logits"]).max() > 1e-3


# ------------------------------------------------------------------ cache properties (hypothesis)


def random_batch(model, source_lengths, target_len, seed):
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    sources = [rng.integers(0, vocab, size=n).tolist() for n in source_lengths]
    targets = rng.integers(0, vocab, size=(len(sources), target_len))
    targets[:, 0] = model.config.decoder_start_token_id
    return sources, targets


def padded(model, sources):
    lengths = np.array([len(s) for s in sources])
    ids = np.zeros((len(sources), lengths.max()), dtype=np.int64)
    for b, s in enumerate(sources):
        ids[b, :len(s)] = s
    return ids, lengths


def cached_vs_recomputed_gap(model, kind, sources, targets, chunks, block_size=4):
    """Feed the target through a cache in ``chunks`` (prefill, then pieces, then single steps) and
    return the largest gap to recomputing every logit without a cache."""
    ids, lengths = padded(model, sources)
    states = model.encode(ids, lengths)
    want = model.forward(targets, encoder_states=states, encoder_lengths=lengths)
    options = {"block_size": block_size} if kind == "paged" else {}
    cache = model.new_cache(kind, batch_size=len(sources), max_seq_len=targets.shape[1], **options)
    gap, start = 0.0, 0
    for size in chunks:
        got = model.forward(targets[:, start:start + size], encoder_states=states, cache=cache,
                            encoder_lengths=lengths)
        gap = max(gap, float(np.abs(got - want[:, start:start + size]).max()))
        start += size
    assert start == targets.shape[1] and cache.lengths.tolist() == [start] * len(sources)
    return gap


def split(total: int, cuts: list[int]) -> list[int]:
    points = sorted(set(c for c in cuts if 0 < c < total))
    return [b - a for a, b in zip([0] + points, points + [total])]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), source_lengths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       target_len=st.integers(1, 18), cuts=st.lists(st.integers(1, 17), max_size=4), block_size=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_incremental_decoding_equals_recomputing(kind, name, source_lengths, target_len, cuts, block_size, seed):
    model = model_for(name)
    sources, targets = random_batch(model, source_lengths, target_len, seed)
    assert cached_vs_recomputed_gap(model, kind, sources, targets, split(target_len, cuts), block_size) < EXACT


def test_a_cross_cache_filled_from_the_wrong_states_is_caught(monkeypatch):
    """Broken variant: a cross cache that stores row 0's K/V for every row (a batching bug)."""
    model = model_for("bart")
    sources, targets = random_batch(model, [9, 5], 6, seed=1)
    assert cached_vs_recomputed_gap(model, "static", sources, targets, [2, 1, 1, 1, 1]) < EXACT
    original = CrossAttentionCache.fill

    def fill_from_row_0(self, k, v, encoder_lengths, source):
        original(self, [np.broadcast_to(x[:1], x.shape) for x in k], v, encoder_lengths, source)

    monkeypatch.setattr(CrossAttentionCache, "fill", fill_from_row_0)
    assert cached_vs_recomputed_gap(model, "static", sources, targets, [2, 1, 1, 1, 1]) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_cross_kv_computed_once_per_source(name, kind):
    model, e = model_for(name), expected(name)
    layers, steps = model.config.decoder_layers, 6
    before = model.cross_kv_computations
    cache = model.new_cache(kind, batch_size=2, max_seq_len=steps)
    out = model.generate(sources_of(e), max_new_tokens=steps, cache=cache, stop_tokens=[])
    assert [len(t) for t in out.tokens] == [steps, steps]
    assert model.cross_kv_computations - before == layers            # once per decoder layer, for the whole run
    assert cache.cross_attention.fills == 1 and cache.cross_attention.nbytes > 0
    # Without the cross cache, the encoder side is projected again at every step: the cost it removes.
    before = model.cross_kv_computations
    again = model.generate(sources_of(e), max_new_tokens=steps, cache=kind, cache_cross=False, stop_tokens=[])
    assert model.cross_kv_computations - before == layers * steps
    assert again.tokens == out.tokens


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(NAMES), source_lengths=st.lists(st.integers(1, 20), min_size=2, max_size=4),
       kind=st.sampled_from(("none",) + KINDS), seed=st.integers(0, 2**16))
def test_a_ragged_batch_of_sources_equals_each_source_alone(name, source_lengths, kind, seed):
    model = model_for(name)
    sources, targets = random_batch(model, source_lengths, 5, seed)
    ids, lengths = padded(model, sources)
    states = model.encode(ids, lengths)
    logits = model.forward(targets, encoder_states=states, encoder_lengths=lengths)
    batch = model.generate(sources, max_new_tokens=5, cache=kind, stop_tokens=[])
    for b, source in enumerate(sources):
        alone_states = model.encode([source])
        assert np.abs(states[b, :len(source)] - alone_states[0]).max() < EXACT
        alone = model.forward(targets[b:b + 1], encoder_states=alone_states)
        assert np.abs(logits[b] - alone[0]).max() < EXACT
        assert batch.tokens[b] == model.generate([source], max_new_tokens=5, cache=kind, stop_tokens=[]).tokens[0]


@pytest.mark.parametrize("name", NAMES)
def test_sampling_with_a_seed_is_repeatable_and_cache_independent(name):
    model, e = model_for(name), expected(name)
    runs = [model.generate(sources_of(e), max_new_tokens=8, cache=kind, temperature=0.9, top_k=20, seed=5,
                           stop_tokens=[]).tokens for kind in ("none", "static", "paged", "static")]
    assert all(r == runs[0] for r in runs)


# ------------------------------------------------------------------ the door: errors leave caches as they were


def test_a_filled_cache_refuses_another_source_and_stays_unchanged():
    model = model_for("t5_relu")
    sources, targets = random_batch(model, [6, 4], 6, seed=2)
    ids, lengths = padded(model, sources)
    states = model.encode(ids, lengths)
    cache = model.new_cache("static", batch_size=2, max_seq_len=4)
    model.forward(targets[:, :2], encoder_states=states, cache=cache, encoder_lengths=lengths)
    k_before = cache.cross_attention.k[0].copy()
    with pytest.raises(InvalidInputError, match="another source"):
        model.forward(targets[:, 2:3], encoder_states=states.copy(), cache=cache)
    with pytest.raises(CacheOverflowError):
        model.forward(targets[:, 2:5], cache=cache)
    assert cache.lengths.tolist() == [2, 2] and np.array_equal(cache.cross_attention.k[0], k_before)
    # The same source object, or none at all, continues.
    model.forward(targets[:, 2:3], encoder_states=states, cache=cache)
    model.forward(targets[:, 3:4], cache=cache)
    assert cache.lengths.tolist() == [4, 4] and cache.cross_attention.fills == 1


def test_a_failed_first_call_leaves_the_cross_cache_empty():
    model = model_for("bart")
    cache = model.new_cache("paged", batch_size=1, max_seq_len=2, block_size=1)
    states = model.encode([[5, 6, 7]])
    with pytest.raises(CacheOverflowError):
        model.forward([[2, 3, 4]], encoder_states=states, cache=cache)
    assert not cache.cross_attention.filled and cache.lengths.tolist() == [0]
    assert cache.self_attention.blocks_in_use == 0
    with pytest.raises(InvalidInputError, match="encoder_states is required"):
        model.forward([[2]], cache=cache)
    with pytest.raises(InvalidInputError, match="out of range"):
        model.forward([[model.config.vocab_size]], encoder_states=states, cache=cache)
    assert not cache.cross_attention.filled and cache.lengths.tolist() == [0]


def test_bad_arguments_are_named_errors():
    model = model_for("t5_v1_1")
    with pytest.raises(ConfigError, match="sliding"):
        model.new_cache("sliding")
    with pytest.raises(InvalidInputError):
        model.encode([[1, 2]], lengths=[3])
    with pytest.raises(InvalidInputError):
        model.generate([], max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        model.generate("hello", max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="encoder_states has shape"):
        model.forward([[0]], encoder_states=np.zeros((1, 3, 5)))
    with pytest.raises(minikv.SequenceTooLongError):
        model_for("bart").generate([[5, 6]], max_new_tokens=41)
    with pytest.raises(ConfigError, match="numpy backend"):
        EncoderDecoder(model.config, model.weights, backend="cuda-sim")


# ------------------------------------------------------------------ loading


def write_safetensors_raw(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file with any dtype name (safetensors.numpy cannot write bfloat16)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, data) in tensors.items():
        raw = np.ascontiguousarray(data).tobytes()
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def copy_fixture(name, tmp_path) -> Path:
    folder = tmp_path / name
    shutil.copytree(ROOT / name, folder)
    return folder


@pytest.mark.parametrize("disk", ("BF16", "F16"))
def test_bfloat16_and_float16_checkpoints_load_exactly(tmp_path, disk):
    folder = copy_fixture("bart", tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    if disk == "BF16":
        # bf16 = the top 16 bits of float32 (truncation: exactly representable, no rounding question)
        stored = {n: ("BF16", (w.view(np.uint32) >> 16).astype(np.uint16)) for n, w in weights.items()}
        as_read = {n: ((w.view(np.uint32) >> 16) << 16).view(np.float32) for n, w in weights.items()}
    else:
        stored = {n: ("F16", w.astype(np.float16)) for n, w in weights.items()}
        as_read = {n: w.astype(np.float16).astype(np.float32) for n, w in weights.items()}
    write_safetensors_raw(folder / "model.safetensors", stored)
    model = minikv.load(folder, dtype="float64")
    assert np.array_equal(model.weights["encoder.layers.1.mlp.up.weight"],
                          as_read["model.encoder.layers.1.fc1.weight"].astype(np.float64))
    assert np.array_equal(model.weights["final_logits_bias"], as_read["final_logits_bias"][0].astype(np.float64))


def test_bad_checkpoints_are_named_errors(tmp_path):
    folder = copy_fixture("t5_relu", tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    write_safetensors_raw(folder / "model.safetensors",
                          {n: ("I32" if n == "shared.weight" else "F32", w.astype(np.int32) if n == "shared.weight"
                               else w) for n, w in weights.items()})
    with pytest.raises(CheckpointError, match="dtype I32"):
        minikv.load(folder)
    missing = dict(weights)
    del missing["decoder.final_layer_norm.weight"]
    save_file(missing, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'decoder.final_layer_norm.weight'"):
        minikv.load(folder)
    save_file(weights, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-gelu"}))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        minikv.load(folder)        # the weights are a relu FFN's: wi, not wi_0 / wi_1
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "swish-gelu-x"}))
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        minikv.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        minikv.load(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        minikv.load(folder)


# ------------------------------------------------------------------ text in, text out (tokenizer, CLI)


def folder_with_tokenizer(tmp_path) -> Path:
    """The t5_v1_1 fixture plus a word-level tokenizer.json (word i <-> id i; </s> appended to a source)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = copy_fixture("t5_v1_1", tmp_path)
    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 64)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_a_text_source_gets_the_tokenizers_special_tokens(tmp_path):
    model = minikv.load(folder_with_tokenizer(tmp_path), dtype="float64")
    text = "w5 w9 w33 w2 w17"
    out = model.generate(text, max_new_tokens=6, stop_tokens=[])
    ids = model.generate([[5, 9, 33, 2, 17, 1]], max_new_tokens=6, stop_tokens=[])
    assert out.tokens == ids.tokens and isinstance(out.text, str)
    assert out.text == " ".join(f"w{t}" if t > 1 else ["<pad>", "</s>"][t] for t in out.tokens[0])


def test_cli_generate_on_an_encoder_decoder_folder(tmp_path):
    import subprocess
    import sys

    folder = folder_with_tokenizer(tmp_path)
    model = minikv.load(folder)
    want = model.generate("w5 w9 w33", max_new_tokens=5, temperature=0.0).text

    def run(*args):
        return subprocess.run([sys.executable, "-m", "minikv", *args], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])

    result = run("generate", "w5 w9 w33", "--model", str(folder), "--max-new-tokens", "5", "--temperature", "0",
                 "--cache", "paged")
    assert result.returncode == 0, result.stderr
    assert result.stdout == want + "\n"
    assert "paged" in result.stderr and "tokens/s" in result.stderr
    bad = run("generate", "w5", "--model", str(folder), "--cache", "sliding")
    assert bad.returncode == 2 and "ConfigError" in bad.stderr and "sliding" in bad.stderr
    info = run("info", "--model", str(folder))
    assert info.returncode == 0 and "EncoderDecoder t5" in info.stdout


def test_the_readme_example_runs(capsys, monkeypatch):
    import re

    root = Path(__file__).resolve().parents[1]
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
                  if "seq2seq" in b]
    monkeypatch.chdir(root)
    exec(compile(example, "README encoder-decoder example", "exec"), {})
    assert capsys.readouterr().out.startswith("[[")


def test_the_benchmark_quick_run(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "benchmarks.seq2seq", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "seq2seq.json").read_text())
    assert all(row["tokens_equal"] for row in report["steps"])
    layers = report["config"]["decoder_layers"]
    for row in report["steps"]:      # counted, not timed: once per layer with the cross cache, per step without
        assert row["cross_kv_projections"]["cross cache"] == layers
        assert row["cross_kv_projections"]["recompute cross K/V"] > layers
    assert (tmp_path / "seq2seq.md").read_text().startswith("## Encoder-decoder")


def test_config_checks_name_the_field():
    from minikv.seq2seq_checkpoint import Seq2SeqConfig

    hf = json.loads((ROOT / "t5_relu" / "config.json").read_text())
    for changes, field in (({"relative_attention_num_buckets": 2}, "num_buckets"),
                           ({"relative_attention_max_distance": 4}, "max_distance"),
                           ({"d_kv": 0}, "d_kv"), ({"decoder_start_token_id": 64}, "decoder_start_token_id"),
                           ({"model_type": "mt5"}, "model_type")):
        with pytest.raises(ConfigError, match=field):
            Seq2SeqConfig.from_hf({**hf, **changes})
    bart = json.loads((ROOT / "bart" / "config.json").read_text())
    for changes, field in (({"activation_function": "swish"}, "activation_function"),
                           ({"normalize_before": True}, "normalize_before"),
                           ({"decoder_attention_heads": 3}, "decoder_attention_heads")):
        with pytest.raises(ConfigError, match=field):
            Seq2SeqConfig.from_hf({**bart, **changes})
    assert Seq2SeqConfig.from_hf({**hf, "feed_forward_proj": "gated-gelu"}).activation == "gelu_new"
    assert Seq2SeqConfig.from_hf({**hf, "feed_forward_proj": "gelu"}).activation == "gelu"


def test_a_float16_cache_halves_both_parts_and_stays_close():
    model, e = model_for("bart", "float32"), expected("bart")
    sources = sources_of(e)
    outs = {}
    for dtype in ("float32", "float16"):
        cache = model.new_cache("static", batch_size=2, max_seq_len=6, dtype=dtype)
        ids, lengths = padded(model, sources)
        states = model.encode(ids, lengths)
        target = e["decoder_ids"][:, :6]
        outs[dtype] = (model.forward(target, encoder_states=states, cache=cache, encoder_lengths=lengths), cache)
    (full, cache32), (half, cache16) = outs["float32"], outs["float16"]
    assert half.dtype == np.float32 and cache16.cross_attention.k[0].dtype == np.float16
    assert cache16.self_attention.nbytes * 2 == cache32.self_attention.nbytes
    assert cache16.cross_attention.nbytes * 2 == cache32.cross_attention.nbytes
    # float16 K/V keep ~3 significant digits (relative rounding 2^-11 ~ 5e-4): logits of size ~4 move by
    # ~1e-3 here; 1% of the largest logit bounds it with room, and a float16 cache that changed nothing fails
    assert 0 < np.abs(half - full).max() < 1e-2 * np.abs(full).max()


@pytest.mark.parametrize("kind", KINDS)
def test_truncate_rewinds_the_target_and_keeps_the_source(kind):
    """Speculative decoding's rewind: drop the last target positions, feed them again, same logits."""
    model = model_for("t5_v1_1")
    sources, targets = random_batch(model, [7, 11], 6, seed=4)
    ids, lengths = padded(model, sources)
    states = model.encode(ids, lengths)
    cache = model.new_cache(kind, batch_size=2, max_seq_len=6, **({"block_size": 2} if kind == "paged" else {}))
    first = model.forward(targets, encoder_states=states, cache=cache, encoder_lengths=lengths)
    cache.truncate([3, 3])
    assert cache.lengths.tolist() == [3, 3] and cache.cross_attention.fills == 1
    again = model.forward(targets[:, 3:], cache=cache)
    assert np.abs(again - first[:, 3:]).max() < EXACT
