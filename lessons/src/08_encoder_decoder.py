# Source of lessons/08_encoder_decoder.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 8: encoder-decoder models and the cross-attention cache
#
# **What it teaches:** encoder-decoder models (T5, BART), cross-attention, and the two caches a
# decoder step needs (one growing, one computed once per source). **What it assumes:** lessons 1-3
# (attention, the KV cache) and 4 (generation).
#
# Everything so far was a *decoder-only* model: one stack that reads the prompt and continues it. T5 and
# BART are **encoder-decoders**: an encoder reads a *source* once (bidirectionally: every source token sees
# every other), and a decoder writes a *target* token by token, attending to two things at every layer:
#
# ```
# states = encode(source)                       # (batch, src_len, d), once
# for each decoder layer:
#     x = x + self_attention(x)                 # causal, over the target so far   -> the self cache
#     x = x + cross_attention(x, states)        # over every source position       -> the cross cache
#     x = x + mlp(x)
# ```
#
# So a decoder step needs **two caches** with different lives: the self-attention cache grows by one
# position per step (exactly lesson 3's), while the cross-attention K and V (`states @ W_k`, `states @ W_v`
# per layer) depend only on the source, which does not change: compute them **once**, read them at every step.
#
# We will
#
# 1. run the decoder loop by hand and check it against `model.generate` and against transformers' own tokens;
# 2. look at T5's **relative position buckets** (its only position information);
# 3. measure what each cache holds, in bytes, against the formulas;
# 4. **count** the encoder-side projections with and without the cross cache;
# 5. **time** a decode step by source length: cross cache vs recomputing it vs no cache at all.

# %%
import time
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt
from safetensors.numpy import load_file

import minikv
from minikv.seq2seq import EncoderDecoder, relative_position_bucket
from minikv.seq2seq_checkpoint import Seq2SeqConfig, seq2seq_tensor_table
from minikv.exercises import check

%matplotlib inline

# A tiny random T5 v1.1 saved by transformers, with the logits it computed; it ships with minikv.
FIXTURES = Path(minikv.__file__).parent / "data" / "hf-examples"
t5 = minikv.load(FIXTURES / "t5_v1_1", dtype="float64")     # a tiny random T5 v1.1 (gated-GELU, untied head)
expected = load_file(str(FIXTURES / "t5_v1_1" / "expected.safetensors"))
print(t5)
c = t5.config
print(f"encoder {c.encoder_layers} layers, decoder {c.decoder_layers} layers, {c.decoder_heads} heads of {c.head_dim}, "
      f"{c.num_buckets} position buckets up to distance {c.max_distance}, decoder start token {c.decoder_start_token_id}")

# %% [markdown]
# ## 1. The decoder loop by hand
#
# The fixture holds a ragged batch of two sources (20 and 13 real tokens, right-padded) and the tokens
# transformers' `generate` produced for them (greedy). The loop: encode once; make an `EncoderDecoderCache`;
# feed the decoder start token; then each step feeds the token just chosen. The first call fills the cross
# cache from `encoder_states`; later calls do not need the states at all.

# %%
lengths = expected["attention_mask"].sum(axis=1)
source_ids = expected["input_ids"]
states = t5.encode(source_ids, lengths)                      # (batch, src_len, d_model)
print("encoder states:", states.shape)

cache = t5.new_cache("static", batch_size=2, max_seq_len=12)
token = np.full((2, 1), c.decoder_start_token_id)
by_hand = [[], []]
for step in range(12):
    logits = t5.forward(token, encoder_states=states if step == 0 else None, cache=cache,
                        encoder_lengths=lengths if step == 0 else None, last_only=True)   # (batch, vocab)
    token = logits.argmax(axis=-1)[:, None]
    for b in range(2):
        by_hand[b].append(int(token[b, 0]))
print("by hand:      ", by_hand)

# transformers' output starts with the start token and stops at eos (then pads)
eos = set(c.eos_token_ids)
hf = []
for row in expected["generated"]:
    out = []
    for t in row[1:].tolist():
        if t in eos:
            break
        out.append(t)
    hf.append(out)
print("transformers: ", hf)
print("generate():   ", t5.generate([row[:n].tolist() for row, n in zip(source_ids, lengths)], max_new_tokens=12).tokens)
for b in range(2):
    assert by_hand[b][:len(hf[b])] == hf[b]

# %% [markdown]
# (Row 0 goes on past transformers' stop: our hand loop has no stop token; `generate` stops at eos as
# transformers does.)
#
# ## 2. T5's positions: buckets of relative distance
#
# T5 has no position embeddings. Layer 0 of each stack owns a small table `bias[bucket, head]` added to the
# attention scores, where the bucket is a function of `key_position - query_position`: exact for small
# distances, logarithmic up to `max_distance`, one shared bucket beyond. The encoder's buckets are
# **bidirectional** (keys after the query get their own half of the buckets); the decoder's are
# **unidirectional** (it cannot see the future anyway). With T5's defaults (32 buckets, distance 128):

# %%
relative = np.arange(-200, 201)
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(relative, relative_position_bucket(relative, True, 32, 128), label="encoder (bidirectional)")
ax.plot(relative, relative_position_bucket(relative, False, 32, 128), label="decoder (unidirectional)")
ax.set_xlabel("key position - query position"); ax.set_ylabel("bucket"); ax.legend(); ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# Because the bias depends on the query's *position*, a cached decode step must compute it for the query at
# position `cache.lengths` against keys `0 .. length`: a decoder that used the bias of position 0 at every
# step would still run, and be wrong. `tests/test_seq2seq.py` catches exactly that (cached == recomputed).
#
# ## 3. What each cache holds
#
# ```
# self cache  = 2 * layers * batch * target positions * heads * head_dim * itemsize   (grows with the target)
# cross cache = 2 * layers * batch * source positions * heads * head_dim * itemsize   (fixed by the source)
# ```

# %%
item = t5.dtype.itemsize
self_formula = 2 * c.decoder_layers * 2 * 12 * c.decoder_heads * c.head_dim * item
cross_formula = 2 * c.decoder_layers * 2 * states.shape[1] * c.decoder_heads * c.head_dim * item
print("| part | formula bytes | nbytes |\n|---|---|---|")
print(f"| self-attention (static, 12 positions) | {self_formula} | {cache.self_attention.nbytes} |")
print(f"| cross-attention ({states.shape[1]} source positions) | {cross_formula} | {cache.cross_attention.nbytes} |")
assert cache.self_attention.nbytes == self_formula and cache.cross_attention.nbytes == cross_formula

# %% [markdown]
# For a long source and a short target (summarising, translating a sentence), the cross cache is the bigger
# of the two.
#
# ## 4. Counting the encoder-side projections
#
# `model.cross_kv_computations` counts how often a decoder layer projected the encoder states to K and V.
# With the cross cache it is once per layer for the whole generation; with `cache_cross=False` (keep the self
# cache, recompute the cross K/V) or with no cache at all, it is once per layer **per step**.

# %%
sources = [row[:n].tolist() for row, n in zip(source_ids, lengths)]
counts = {}
for label, options in (("cross cache", dict(cache="static")), ("recompute cross K/V", dict(cache="static", cache_cross=False)),
                       ("no cache", dict(cache="none"))):
    before = t5.cross_kv_computations
    out = t5.generate(sources, max_new_tokens=10, stop_tokens=[], **options)
    counts[label] = t5.cross_kv_computations - before
print("| mode | projections for 10 steps |\n|---|---|")
for label, n in counts.items():
    print(f"| {label} | {n} |")

# %% [markdown]
# ## 5. The measured saving
#
# A random T5-shaped model in float32 (d_model 128, 4 + 4 layers), one source of growing length, a few greedy
# decode steps in each mode; the median step time (the first step, which fills the caches, excluded). The
# benchmark `python -m benchmarks.seq2seq` measures the same on a bigger model up to 2048 source tokens
# (results in `benchmarks/results/seq2seq.md`).

# %%
small = Seq2SeqConfig(model_type="t5", vocab_size=256, d_model=128, encoder_layers=4, decoder_layers=4,
                      encoder_heads=4, decoder_heads=4, head_dim=32, encoder_ffn=512, decoder_ffn=512,
                      activation="gelu_new", gated=True, norm_eps=1e-6, tie_word_embeddings=False,
                      scale_decoder_outputs=False, num_buckets=32, max_distance=128, eos_token_ids=(1,))
rng = np.random.default_rng(0)
weights = {}
for row in seq2seq_tensor_table(small):
    shape = row.ours_shape or row.shape
    weights[row.ours] = (np.ones(shape) if "norm" in row.ours else rng.standard_normal(shape) * shape[-1] ** -0.5)
model = EncoderDecoder(small, weights, dtype="float32")


def step_ms(model, states, mode, steps=6):
    cache = None if mode == "no cache" else model.new_cache("static", 1, steps, cache_cross=(mode == "cross cache"))
    target = np.zeros((1, 1), dtype=np.int64)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if cache is None:
            logits = model.forward(target, encoder_states=states, last_only=True)
        else:
            logits = model.forward(target[:, -1:], encoder_states=states, cache=cache, last_only=True)
        times.append(time.perf_counter() - t0)
        target = np.concatenate([target, logits.argmax(-1)[:, None]], axis=1)
    return 1e3 * float(np.median(times[1:]))


modes = ("cross cache", "recompute cross K/V", "no cache")
source_lengths = [16, 64, 256, 512]
results = {mode: [] for mode in modes}
for n in source_lengths:
    states_n = model.encode(rng.integers(2, 256, size=(1, n)))
    for mode in modes:
        results[mode].append(min(step_ms(model, states_n, mode) for _ in range(2)))
print("| source tokens | " + " | ".join(f"{m} ms" for m in modes) + " | recompute / cache |")
print("|---|" + "---|" * (len(modes) + 1))
for i, n in enumerate(source_lengths):
    ratio = results["recompute cross K/V"][i] / results["cross cache"][i]
    print(f"| {n} | " + " | ".join(f"{results[m][i]:.2f}" for m in modes) + f" | {ratio:.1f}x |")
fig, ax = plt.subplots(figsize=(6, 3.5))
for mode in modes:
    ax.plot(source_lengths, results[mode], marker="o", label=mode)
ax.set_xscale("log", base=2); ax.set_xlabel("source tokens"); ax.set_ylabel("decode step (ms)"); ax.legend()
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# The cached step barely depends on the source length: it reads K/V of `src_len` positions (a matrix-vector
# product per head). Recomputing them is a `(src_len, d) @ (d, 2 * heads * head_dim)` matmul per layer per
# step, so its cost grows with the source. Your machine's timings vary; the trend does not.
#
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/08_encoder_decoder.py`](solutions/08_encoder_decoder.py).
#
# **Exercise 1.** A ragged batch must give each source exactly what it would get alone (padding keys are
# masked in the encoder *and* in cross-attention). Encode the two fixture sources one at a time and check
# each against the real rows of the batched `states`, in float64 (to 1e-10).

# %%
# --- your solution ---
gaps = ...   # per source: max |row of the batched states - that source encoded alone| (a list of floats)
# --- check ---
with check(1, gaps):
    print("largest gap:", max(gaps))
    assert max(gaps) < 1e-10

# %% [markdown]
# **Exercise 2.** Break the cache on purpose: decode with a cache whose cross part is filled from the *wrong*
# source (the second row's states for both rows) and show that the logits of the first row change, while a
# cache filled from the right states equals recomputing without a cache.

# %%
target = np.array([[c.decoder_start_token_id, 5, 9], [c.decoder_start_token_id, 7, 3]])
want = t5.forward(target, encoder_states=states, encoder_lengths=lengths)

# --- your solution ---
got = ...       # t5.forward(target, ...) with a fresh static cache filled from the right states
got_bad = ...   # the same with a fresh cache whose cross part comes from the second row's states for both rows
# --- check ---
with check(2, got, got_bad):
    assert np.abs(got - want).max() < 1e-10
    assert np.abs(got_bad[0] - want[0]).max() > 1e-3
