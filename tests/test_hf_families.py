"""Conformance of the bfloat16 families with Hugging Face transformers 5.24: RoPE scaling, Qwen3, Gemma 3.

Each folder in tests/fixtures/hf_families/ is a tiny random HF checkpoint saved in **bfloat16** (as Hub
checkpoints are), written by scripts/make_hf_fixtures.py (it needs torch; these tests do not), with
expected.safetensors: input_ids (2, 40), `logits` (float64: HF's model on the upcast weights with its
float32 islands kept in float64), `logits_float32` (HF's own float32 model on the same weights) and
`generated` (HF's float32 greedy `generate`, 8 new tokens per row).

What each fixture pins down:
    llama_rope_llama3   Llama 3.x scaling: factor 8, low/high 1/4, original length 16 (one pair in the ramp)
    llama_rope_linear   linear (position interpolation), factor 2
    llama_rope_dynamic  dynamic NTK, factor 4, max_position_embeddings 16: the base grows with each call's
                        length, and with a cache earlier keys keep their call's rotation (as in transformers)
    llama_rope_yarn     yarn, factor 4, original length 16, theta 100, betas 4/0.25: extrapolated, ramped and
                        interpolated pairs, attention factor 0.1 ln 4 + 1 on cos and sin
    qwen3               Qwen3: per-head RMSNorm on q and k before RoPE, head_dim 12 != 32/4, tied embeddings
    qwen3_yarn          Qwen3 with yarn as it ships for long context (default betas)
    gemma3_text         Gemma 3: layers sliding(8) / full / sliding with RoPE bases 1e4 / 1e6 (linear x2 on the
                        full layer), q/k norms, (1 + w) norms before and after attention and MLP, GeGLU,
                        embeddings * sqrt(32) (rounded to the model dtype), query_pre_attn_scalar 24 != head_dim
                        16, final logit softcapping 5; inputs of 40 tokens cross the window

Every input is 40 tokens: past every original length (16) and Gemma's window (8).
Tolerances: float64 < 1e-10 against the exact reference; float32 < 1e-4 against HF's float32 model
(measured gaps 2e-6 .. 1.3e-5, recorded in each file's metadata); greedy ids equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import minikv
from minikv.checkpoint import load_checkpoint

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "hf_families"
EXPECTED = {"llama_rope_llama3", "llama_rope_linear", "llama_rope_dynamic", "llama_rope_yarn", "qwen3",
            "qwen3_yarn", "gemma3_text"}
FIXTURES = sorted(p.name for p in FIXTURE_ROOT.iterdir() if (p / "expected.safetensors").is_file())
FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-4

_models: dict = {}


def read_expected(name: str) -> dict[str, np.ndarray]:
    with safe_open(str(FIXTURE_ROOT / name / "expected.safetensors"), framework="numpy") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def model_for(name: str, dtype: str) -> minikv.Transformer:
    if (name, dtype) not in _models:
        _models[(name, dtype)] = minikv.load(FIXTURE_ROOT / name, dtype=dtype)
    return _models[(name, dtype)]


def test_every_fixture_is_present_and_stored_in_bfloat16():
    assert set(FIXTURES) == EXPECTED
    for name in FIXTURES:
        raw = (FIXTURE_ROOT / name / "model.safetensors").read_bytes()     # the dtype is in the raw header
        header = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
        assert '"BF16"' in header and '"F32"' not in header, name


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_meaningful(name):
    expected = read_expected(name)
    ids, logits = expected["input_ids"], expected["logits"]
    assert ids.shape == (2, 40) and logits.shape[:2] == (2, 40) and logits.dtype == np.float64
    assert ids.min() == 0 and ids.max() == logits.shape[2] - 1
    assert float(np.std(logits)) > 0.1
    assert expected["generated"].shape == (2, 8)


@pytest.mark.parametrize("name", FIXTURES)
def test_float64_logits_match_the_exact_reference(name):
    expected = read_expected(name)
    logits = np.asarray(model_for(name, "float64").forward(expected["input_ids"]))
    assert logits.dtype == np.float64
    diff = float(np.max(np.abs(logits - expected["logits"])))
    assert diff < FLOAT64_TOL, f"{name}: max |minikv - reference| = {diff:.3e}"


@pytest.mark.parametrize("name", FIXTURES)
def test_float32_logits_match_transformers_float32(name):
    expected = read_expected(name)
    logits = np.asarray(model_for(name, "float32").forward(expected["input_ids"]))
    assert logits.dtype == np.float32
    diff = float(np.max(np.abs(logits - expected["logits_float32"])))
    assert diff < FLOAT32_TOL, f"{name}: max |minikv - HF float32| = {diff:.3e}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_ids_equal_transformers_generate(name, dtype):
    expected = read_expected(name)
    out = model_for(name, dtype).generate(expected["input_ids"].tolist(), max_new_tokens=8, temperature=0.0)
    assert out.tokens == expected["generated"].tolist()


def test_position_limits():
    # dynamic NTK runs past max_position_embeddings (16): minikv allows factor (4) times it
    assert model_for("llama_rope_dynamic", "float64").config.max_positions == 64
    with pytest.raises(minikv.SequenceTooLongError, match="dynamic"):
        model_for("llama_rope_dynamic", "float64").forward(np.zeros((1, 65), dtype=np.int64))


@pytest.mark.parametrize("name", ["gemma3_text", "qwen3", "llama_rope_yarn", "llama_rope_llama3"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_cached_equals_recomputed(name, data):
    """Prefill a prefix, then decode the rest token by token (or in chunks): every row of logits equals
    the full recomputation. For Gemma the 40 positions cross its window of 8 in every sliding layer."""
    model = model_for(name, "float64")
    ids = read_expected(name)["input_ids"][:1]
    kind = data.draw(st.sampled_from(["static", "paged", "concat"]))
    split = data.draw(st.integers(1, 39))
    chunk = data.draw(st.integers(1, 8))
    full = np.asarray(model.forward(ids))
    cache = model.new_cache(kind, batch_size=1, max_seq_len=40)
    rows = [np.asarray(model.forward(ids[:, :split], cache=cache))]
    for start in range(split, 40, chunk):
        rows.append(np.asarray(model.forward(ids[:, start:start + chunk], cache=cache)))
    assert np.max(np.abs(np.concatenate(rows, axis=1) - full)) < 1e-10


def test_dynamic_ntk_cached_keys_keep_their_calls_rotation():
    """transformers recomputes dynamic NTK frequencies per call and never re-rotates cached keys, so
    decoding after a long prefill is *not* the recomputation; minikv matches transformers (the greedy test)
    and this shows the difference is real (a model that re-rotated would pass a cached == recomputed test)."""
    model = model_for("llama_rope_dynamic", "float64")
    ids = read_expected("llama_rope_dynamic")["input_ids"][:1]
    cache = model.new_cache("static", batch_size=1, max_seq_len=41)
    model.forward(ids[:, :39], cache=cache)
    stepped = np.asarray(model.forward(ids[:, 39:40], cache=cache))[:, -1]
    recomputed = np.asarray(model.forward(ids))[:, -1]
    assert np.max(np.abs(stepped - recomputed)) > 1e-6
    # Below the original length (16) nothing is scaled: there the two agree.
    cache = model.new_cache("static", batch_size=1, max_seq_len=16)
    model.forward(ids[:, :10], cache=cache)
    stepped = np.asarray(model.forward(ids[:, 10:11], cache=cache))[:, -1]
    assert np.max(np.abs(stepped - np.asarray(model.forward(ids[:, :11]))[:, -1])) < 1e-10


def test_gemma_window_edge_is_pinned():
    """The same weights with a window of 9 or 7 instead of 8 must fail the comparison: the fixture pins
    "query i sees key j iff 0 <= i - j < W" (W keys, as in transformers 5.24 for Gemma 3 and Mistral)."""
    config, weights = load_checkpoint(FIXTURE_ROOT / "gemma3_text", dtype="float64")
    expected = read_expected("gemma3_text")
    for wrong in (config.sliding_window - 1, config.sliding_window + 1):
        model = minikv.Transformer(config.replace(sliding_window=wrong), weights, dtype="float64")
        assert np.max(np.abs(np.asarray(model.forward(expected["input_ids"])) - expected["logits"])) > 1e-6


@pytest.mark.parametrize("broken", ["norm_without_one_plus", "swiglu_instead_of_geglu", "no_qk_norm",
                                    "no_embed_scale", "no_post_norms", "local_theta_global", "no_softcap"])
def test_deliberately_broken_gemma_variants_are_caught(broken, monkeypatch):
    """Each Gemma-specific step matters: dropping it moves the logits far beyond the float64 tolerance."""
    config, weights = load_checkpoint(FIXTURE_ROOT / "gemma3_text", dtype="float64")
    if broken == "no_softcap":
        config = config.replace(final_logit_softcapping=None)
    model = minikv.Transformer(config, weights, dtype="float64")
    if broken == "norm_without_one_plus":
        monkeypatch.setattr(minikv.layers, "rms_norm_one_plus", minikv.layers.rms_norm)
    elif broken == "swiglu_instead_of_geglu":
        monkeypatch.setattr(minikv.layers, "geglu", minikv.layers.swiglu)
    elif broken == "no_qk_norm":
        for layer in model.layers:
            layer.qk_norm = None
    elif broken == "no_post_norms":
        for layer in model.layers:
            layer.post_attn_norm = layer.post_mlp_norm = None
    elif broken == "no_embed_scale":
        model.embed_scale = None
    elif broken == "local_theta_global":
        model.rope_tables["sliding_attention"] = model.rope_tables["full_attention"]
    expected = read_expected("gemma3_text")
    assert np.max(np.abs(np.asarray(model.forward(expected["input_ids"])) - expected["logits"])) > 1e-3


def test_gemma_sliding_cache_is_refused_when_a_layer_is_global():
    model = model_for("gemma3_text", "float64")
    with pytest.raises(minikv.ConfigError, match="full-attention"):
        model.new_cache("sliding", batch_size=1, max_seq_len=40, window=8)


@pytest.mark.parametrize("name", ["qwen3", "gemma3_text"])
def test_rope_convention_conversion_keeps_the_logits_with_qk_norms(name):
    """The per-head q/k norm gains are permuted with the q/k rows: interleaved weights, same logits."""
    model = model_for(name, "float64")
    ids = read_expected(name)["input_ids"]
    interleaved = model.with_rope_convention("interleaved")
    assert interleaved.config.rope_convention == "interleaved"
    assert np.max(np.abs(np.asarray(interleaved.forward(ids)) - np.asarray(model.forward(ids)))) < 1e-12


@pytest.mark.parametrize("name", FIXTURES)
def test_save_and_reload_gives_the_same_model(tmp_path, name):
    """model.save writes the family's config.json (to_hf refuses what would load back differently) and
    weights; minikv reads the folder back to the same config and the same logits."""
    model = model_for(name, "float64")
    folder = model.save(tmp_path / name)
    again = minikv.load(folder, dtype="float64")
    assert again.config == model.config
    ids = read_expected(name)["input_ids"]
    assert np.array_equal(np.asarray(again.forward(ids)), np.asarray(model.forward(ids)))


@pytest.mark.parametrize("name", FIXTURES)
def test_tensor_table_names_every_tensor_of_the_file(name):
    from minikv.checkpoint import expected_shapes, read_safetensors, tensor_table

    config = model_for(name, "float64").config
    table = tensor_table(config)
    raw = read_safetensors(FIXTURE_ROOT / name / "model.safetensors")
    assert {row.hf for row in table} == set(raw)
    assert sorted(n for row in table for n in row.ours) == sorted(expected_shapes(config))


@pytest.mark.parametrize("cache", ["none", "concat", "paged"])
@pytest.mark.parametrize("name", ["gemma3_text", "llama_rope_dynamic", "qwen3_yarn"])
def test_greedy_ids_with_every_cache_kind(name, cache):
    expected = read_expected(name)
    out = model_for(name, "float32").generate(expected["input_ids"].tolist(), max_new_tokens=8, temperature=0.0,
                                              cache=cache)
    if name == "llama_rope_dynamic" and cache == "none":
        # Recomputing rotates every key with the current length's frequencies, which transformers'
        # cached generate never does: the two may part. Only the first token (one forward) must agree.
        assert [row[0] for row in out.tokens] == expected["generated"][:, 0].tolist()
    else:
        assert out.tokens == expected["generated"].tolist()


@pytest.mark.parametrize("name", ["gemma3_text", "llama_rope_dynamic", "qwen3"])
def test_numba_backend_matches_transformers(name):
    pytest.importorskip("numba")
    expected = read_expected(name)
    model = minikv.load(FIXTURE_ROOT / name, backend="numba")
    diff = float(np.max(np.abs(np.asarray(model.forward(expected["input_ids"])) - expected["logits_float32"])))
    assert diff < FLOAT32_TOL
    out = model.generate(expected["input_ids"].tolist(), max_new_tokens=8, temperature=0.0, cache="paged")
    assert out.tokens == expected["generated"].tolist()


def test_generation_past_the_dynamic_limit_names_it():
    model = model_for("llama_rope_dynamic", "float64")
    with pytest.raises(minikv.SequenceTooLongError, match="dynamic RoPE factor 4 x max_position_embeddings=64"):
        model.generate([[1] * 60], max_new_tokens=10)


@pytest.mark.parametrize("options", [{"speculative": "prompt_lookup"}, {"prefill_chunk": 8}])
def test_dynamic_ntk_refuses_multi_token_calls_that_would_change_the_rotation(options):
    """Dynamic NTK's frequencies depend on each call's length: speculative verification (k+1 tokens per
    call) or a chunked prefill would silently give other tokens than plain generation; both are refused."""
    model = model_for("llama_rope_dynamic", "float64")
    ids = read_expected("llama_rope_dynamic")["input_ids"][:1].tolist()
    with pytest.raises(minikv.ConfigError, match="dynamic"):
        model.generate(ids, max_new_tokens=4, temperature=0.0, **options)
    # A model without dynamic scaling takes the same options (and gives the plain tokens).
    plain = model_for("llama_rope_yarn", "float64")
    yarn_ids = read_expected("llama_rope_yarn")["input_ids"][:1].tolist()
    assert (plain.generate(yarn_ids, max_new_tokens=4, temperature=0.0, **options).tokens
            == plain.generate(yarn_ids, max_new_tokens=4, temperature=0.0).tokens)
