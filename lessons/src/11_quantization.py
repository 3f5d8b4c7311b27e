# Source of lessons/11_quantization.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 11: quantization and the memory wall
#
# **What it teaches:** why decoding is limited by memory, group-wise int8/int4 weight quantization
# and its error bound, what it costs in quality, and an int8 KV cache. **What it assumes:** lessons
# 3 (the model's weights, the cache) and 4 (decode).
#
# Generating one token at batch 1 multiplies a single vector by every weight matrix of the model. Each
# weight is read from memory once and used for **one** multiply-add. A CPU core can do dozens of
# multiply-adds in the time memory delivers one float32, so decode speed is set by **bytes read per
# token**, not by arithmetic: the memory wall.
#
# Quantization attacks the bytes: store each weight in 8 or 4 bits instead of 32. In this lesson we
#
# 1. see the wall: one row against 64 rows through the same matrix;
# 2. count **bytes per token** for the bundled model in float32, int8 and int4;
# 3. quantize a matrix by hand with minikv's group-wise format and check the error bound;
# 4. measure what quantization **costs in quality** (perplexity and KL to float32);
# 5. quantize the **KV cache** too.
#
# Everything runs on the NumPy reference (`minikv/quant.py`); the fast kernels live in the numba backend
# (`backends/numba_decode.py`) and are tested to equal this reference.

# %%
import time

import numpy as np

import minikv
from minikv import quant
from minikv.exercises import check

model = minikv.load()
print(model)

# %% [markdown]
# ## 1. The wall: flops per byte
#
# A (4096 x 4096) float32 matrix is 64 MB, more than this machine's caches hold. Multiplying it by 1 row
# does 2 flops per 4 bytes read; by 64 rows, 128 flops per 4 bytes. Watch the GFLOP/s column.

# %%
rng = np.random.default_rng(0)
w = rng.standard_normal((4096, 4096), dtype=np.float32)


def best_time(f, repeats=5):
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


for rows in (1, 8, 64):
    x = rng.standard_normal((rows, 4096), dtype=np.float32)
    seconds = best_time(lambda: x @ w)
    print(f"{rows:3d} rows: {seconds * 1e3:7.2f} ms   {rows * 4096 * 4096 * 2 / seconds / 1e9:7.1f} GFLOP/s   "
          f"{w.nbytes / seconds / 1e9:6.1f} GB/s of weights")
del w

# %% [markdown]
# With one row, each weight is used once: the time can never drop below (64 MB) / (memory bandwidth), however
# fast the arithmetic. On a quiet machine with all cores at work, the one-row product reaches a small fraction
# of the 64-row GFLOP/s: it waits on memory. (On one busy core the gap narrows, because one core's arithmetic
# is then slow too; compare the numbers above.) A decode step at batch 1 is the one-row case. Prefill and large
# batches reuse each weight for many rows and become compute-bound; that is why servers batch.
#
# ## 2. Bytes per token
#
# At batch 1 a step reads every projection matrix and the lm_head once (the embedding table only one row).
# minikv can quantize them at load: `minikv.load(quantize="int8")` or `"int4"`.

# %%
def projection_bytes(m):
    layers = sum(w.nbytes for layer in m.layers for w in (layer.qkv, layer.o, layer.mlp_in, layer.mlp_down))
    return layers + m.lm_head.nbytes


models = {"float32": model, "int8": minikv.load(quantize="int8"), "int4": minikv.load(quantize="int4")}
print("| weights | MiB read per token | bits per weight |")
print("|---|---|---|")
for name, m in models.items():
    print(f"| {name} | {projection_bytes(m) / 2**20:.2f} | {32 * projection_bytes(m) / projection_bytes(model):.2f} |")

# %% [markdown]
# int8 is 8.5 bits per weight (one float32 scale per 64 weights), int4 5 bits (one per 32). At a fixed memory
# bandwidth the best possible tokens/s grows by the same factor: ~3.8x and ~6.4x. The benchmark
# `benchmarks/quant_decode.py` measures how much of it the kernels get (README, "Quantized decode").
#
# ## 3. Group-wise symmetric quantization, by hand
#
# A row of W is cut into groups of `g` weights; each group gets one scale `s = max|w| / qmax` and its weights
# become integers `q = round(w / s)` in `[-qmax, qmax]` (qmax 127 for int8, 7 for int4). Dequantized,
# `w ~ q * s`. Rounding misses by at most half a step: `|w - q s| <= s / 2`.

# %%
row = rng.standard_normal((1, 8), dtype=np.float32)
qw = quant.quantize(row, "int4", group=8)
print("w      ", np.round(row[0], 3))
print("scale  ", qw.scales[0])
print("q      ", quant.integer_values(qw)[0])
print("q*scale", np.round(quant.dequantize(qw)[0], 3))

# %%
for fmt in ("int8", "int4"):
    w_layer = model.weights["layers.0.mlp.up.weight"]                  # (out, in) = (608, 256)
    qw = quant.quantize(w_layer, fmt)
    deq = quant.dequantize(qw)
    error = np.abs(w_layer - deq)
    # the bound: half a step, plus the float32 rounding of q * s itself (half an ulp of the result)
    bound = np.repeat(qw.scales, qw.group, axis=1)[:, :w_layer.shape[1]] / 2 + np.spacing(np.abs(deq)) / 2
    print(f"{fmt}: max error {error.max():.2e}, mean error {error.mean():.2e}, "
          f"every element within half a step: {bool((error <= bound).all())}")

# %% [markdown]
# One outlier in a group inflates that group's scale and with it the error of its 63 neighbours: that is why
# the groups are small (64, 32) and why each has its own scale.
#
# ## 4. What it costs in quality
#
# Perplexity on a few held-out-style sentences (the full measurement on the model's validation split is in
# `benchmarks/results/quantization.md`), and the mean KL divergence from the float32 model's
# next-byte distribution.

# %%
text = ("Q: What is the difference between a duck? A: One leg is both the same.\n\n"
        "You will be successful in your work, but only after a long period of patience.\n\n"
        "Never trust a computer you cannot throw out of a window.\n\n")
ids = np.array([list(text.encode("utf-8"))])


def log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


reference = log_softmax(model.forward(ids[:, :-1])[0])
targets = ids[0, 1:]
print("| weights | perplexity | mean KL to float32 (nats) |")
print("|---|---|---|")
for name, m in models.items():
    lp = log_softmax(m.forward(ids[:, :-1])[0])
    nll = -lp[np.arange(len(targets)), targets].mean()
    kl = (np.exp(reference) * (reference - lp)).sum(axis=-1).mean()      # KL(p_float32 || p_quantized)
    print(f"| {name} | {np.exp(nll):.4f} | {kl:.5f} |")

# %% [markdown]
# int8 barely moves the model (KL ~1e-4 nats); int4 costs visibly more. Small models suffer most: each
# weight carries more of the function.
#
# ## 5. The KV cache in int8
#
# The cache grows with every token, so at long contexts it rivals the weights in bytes read per step.
# `cache_dtype="int8"` stores each key and value row (one token, one head) as int8 with its own float32 scale.

# %%
float_cache = model.new_cache("static", batch_size=1, max_seq_len=256)
int8_cache = model.new_cache("static", batch_size=1, max_seq_len=256, dtype="int8")
print(f"bytes per position: float32 {float_cache.bytes_per_position()}, int8 {int8_cache.bytes_per_position()}")
a = model.forward(ids[:, :60], cache=float_cache)
b = model.forward(ids[:, :60], cache=int8_cache)
print(f"largest logit difference after 60 positions: {np.abs(a - b).max():.4f}")
out = model.generate("Never trust", max_new_tokens=40, cache_dtype="int8", temperature=0.0)
print(repr(out.text))

# %% [markdown]
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` with your answer and run the cell. The check prints `exercise N: not solved yet` while the stub
# is there, `exercise N: correct` when your answer passes, and stops with a `WrongAnswer` naming the
# failed check otherwise. Solutions: [`solutions/11_quantization.py`](solutions/11_quantization.py).
#
# **Exercise 1.** Bits per weight of int4 with group 32 and a float32 scale: `4 + 32 / 32 = 5`. Compute
# the int8 figure for group 64, and the int4 figure if the group were 128.

# %%
# --- your solution ---
int8_bits_group_64 = ...    # bits per weight: int8 values, one float32 scale per 64 weights
int4_bits_group_128 = ...   # bits per weight: int4 values, one float32 scale per 128 weights
# --- check ---
with check(1, int8_bits_group_64, int4_bits_group_128):
    assert int8_bits_group_64 == models["int8"].layers[0].o.bits_per_weight
    assert int4_bits_group_128 == quant.quantize(np.ones((4, 256), np.float32), "int4", group=128).bits_per_weight

# %% [markdown]
# **Exercise 2.** The int8 KV cache stores `head_dim` int8 values and one float32 scale per row: for this
# model's `head_dim = 32`, how many bytes per position (both K and V, every layer and kv head)?

# %%
# --- your solution ---
kv_int8_bytes = ...   # bytes per position of the int8 KV cache
# --- check ---
with check(2, kv_int8_bytes):
    assert kv_int8_bytes == int8_cache.bytes_per_position()
