# Source of lessons/03_kv_cache.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 3: the KV cache
#
# **What it teaches:** what one transformer block computes (built by hand and checked against
# `model.forward`), what a KV cache stores, what it saves and what it costs, measured.
# **What it assumes:** lessons 1 (attention, the causal mask) and 2 (RoPE), NumPy.
#
# To generate token `t + 1`, attention at every layer needs the keys and values of **all** positions
# `0..t`. Those never change once computed (a position never looks at the future), so recomputing them
# at every step is wasted work. A **KV cache** keeps them.
#
# On minikv's bundled model (a 3.9M-parameter byte-level LLaMA trained on fortune cookies) we will
#
# 0. build **one transformer block by hand** from the model's weights, and the whole model from six of
#    them, checked against `model.forward`; see where K and V come from and how a cache holds them;
# 1. check that recomputing, a `concat` cache and a `static` cache produce **the same tokens**;
# 2. **measure the cost of each step** against the position, for each;
# 3. count the **bytes** the `concat` cache copies;
# 4. check the **memory formula** against `cache.nbytes`;
# 5. find out **where caching does not pay**, and test two claims from other projects' write-ups.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt

import minikv
from minikv.exercises import check

%matplotlib inline

model = minikv.load()
config = model.config
print(model)
print(f"layers {config.n_layers}, kv heads {config.n_kv_heads}, head_dim {config.head_dim}, "
      f"max positions {config.max_position_embeddings}")

# %% [markdown]
# ## 0. One transformer block, by hand
#
# A KV cache stores what the blocks of a transformer compute, so first build one block ourselves from
# the model's weights. A LLaMA block (the bundled model is one) is two residual steps, each on a
# normalised copy of the running activations `x`:
#
# $$h = x + \mathrm{Attention}(\mathrm{RMSNorm}(x)), \qquad y = h + \mathrm{MLP}(\mathrm{RMSNorm}(h))$$
#
# Attention mixes information *between* positions (each looks at itself and earlier ones); the MLP works
# on each position alone. minikv lays the weights of block `i` out in `model.layers[i]` at load time:
# `attn_norm` (d,), `qkv` (d, (H + 2 KV) hd): the q, k and v projections side by side, `o` (H hd, d),
# `mlp_norm` (d,), `mlp_in` (d, 2 I): the SwiGLU gate and up projections side by side, `mlp_down` (I, d).
# Here d = 256, H = 8 query heads, KV = 2 key/value heads, hd = 32 per head, I = 608.

# %%
from minikv import attention, layers, rope

ids = np.array([model.tokenizer.encode("A journey of a thousand miles")])     # (1, seq): one id per byte
seq = ids.shape[1]
H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
block = model.layers[0]
x = layers.embedding(model.embed, ids)                                         # (1, seq, d)
print("token ids", ids.shape, "-> embeddings x", x.shape)

# %% [markdown]
# **The attention half.** Normalise (`x / rms(x) * weight`), project to q, k and v, split the heads, rotate
# q and k by their positions (lesson 2), attend causally (lesson 1; each of the 2 K/V heads serves 4 query
# heads), put the heads side by side again, project back with `o`, and add to `x`. The `k` and `v` made
# here are exactly what a KV cache keeps: they depend only on the tokens up to their own position.

# %%
h = layers.rms_norm(x, block.attn_norm, config.norm_eps)
qkv = layers.linear(h, block.qkv)                                              # (1, seq, (H + 2 KV) hd)
# (1, seq, H*hd) -> (1, seq, H, hd) -> (1, H, seq, hd): one matrix of rows per head
q = qkv[..., :H * hd].reshape(1, seq, H, hd).transpose(0, 2, 1, 3)
k = qkv[..., H * hd:(H + KV) * hd].reshape(1, seq, KV, hd).transpose(0, 2, 1, 3)
v = qkv[..., (H + KV) * hd:].reshape(1, seq, KV, hd).transpose(0, 2, 1, 3)
cos, sin = model.rope_cos[:seq][None, None], model.rope_sin[:seq][None, None]  # positions 0..seq-1
q = rope.apply_rope(q, cos, sin, config.rope_convention)
k = rope.apply_rope(k, cos, sin, config.rope_convention)
heads = attention.naive(q, k, v)                                               # (1, H, seq, hd), causal
# (1, H, seq, hd) -> (1, seq, H, hd) -> (1, seq, H*hd): the heads side by side again
heads = heads.transpose(0, 2, 1, 3).reshape(1, seq, H * hd)
x_mid = x + layers.linear(heads, block.o)                                      # the first residual add
print("q", q.shape, " k", k.shape, " v", v.shape, " -> x after attention", x_mid.shape)

# %% [markdown]
# **The MLP half (SwiGLU).** Normalise again, project up to two vectors of size I, gate one with the
# other (`silu(gate) * up`, where `silu(z) = z * sigmoid(z)`), project back down, add.

# %%
h = layers.rms_norm(x_mid, block.mlp_norm, config.norm_eps)
gate_up = layers.linear(h, block.mlp_in)                                       # (1, seq, 2 I)
gate, up = gate_up[..., :config.intermediate_size], gate_up[..., config.intermediate_size:]
x_out = x_mid + layers.linear(layers.swiglu(gate, up), block.mlp_down)        # (1, seq, d)
print("one block:", x.shape, "->", x_out.shape)

# %% [markdown]
# **The whole model** is the embedding, the same block six times (each with its own weights), a final
# RMSNorm and the `lm_head` projection to one logit per byte value. The same steps as above, in one
# function, run over every block, must give `model.forward`'s logits (to float32 rounding):

# %%
def block_by_hand(x, block):
    h = layers.rms_norm(x, block.attn_norm, config.norm_eps)
    qkv = layers.linear(h, block.qkv)
    q = rope.apply_rope(qkv[..., :H * hd].reshape(1, seq, H, hd).transpose(0, 2, 1, 3), cos, sin,
                        config.rope_convention)
    k = rope.apply_rope(qkv[..., H * hd:(H + KV) * hd].reshape(1, seq, KV, hd).transpose(0, 2, 1, 3), cos, sin,
                        config.rope_convention)
    v = qkv[..., (H + KV) * hd:].reshape(1, seq, KV, hd).transpose(0, 2, 1, 3)
    heads = attention.naive(q, k, v).transpose(0, 2, 1, 3).reshape(1, seq, H * hd)
    x = x + layers.linear(heads, block.o)
    gate_up = layers.linear(layers.rms_norm(x, block.mlp_norm, config.norm_eps), block.mlp_in)
    gate, up = gate_up[..., :config.intermediate_size], gate_up[..., config.intermediate_size:]
    return x + layers.linear(layers.swiglu(gate, up), block.mlp_down)

assert np.allclose(block_by_hand(x, model.layers[0]), x_out, rtol=0, atol=1e-6)   # the cells above, again
x_all = x
for block in model.layers:
    x_all = block_by_hand(x_all, block)
logits_by_hand = layers.rms_norm(x_all, model.final_norm, config.norm_eps) @ model.lm_head   # (1, seq, 256)
difference = np.abs(logits_by_hand - model.forward(ids)).max()
print(f"{len(model.layers)} blocks by hand: max |logits - model.forward(ids)| = {difference:.1e} (float32)")
assert difference < 1e-4
print("next byte after the prompt, by hand:", repr(chr(logits_by_hand[0, -1].argmax())))

# %% [markdown]
# ## 0b. Write, then attend
#
# A cache **stores**; it does not attend. Inside `model.forward`, every layer does two visible things: write
# this step's K/V into the cache, then attend over everything the cache holds. Here they are, printed from
# minikv's own source:

# %%
import inspect

for line in inspect.getsource(minikv.Transformer._forward).splitlines():
    if "cache.update" in line or "self._attend(" in line or "cache.reserve" in line:
        print(line.strip())

# %% [markdown]
# The same loop by hand, for one layer with random K/V: `reserve` claims room (or raises
# `CacheOverflowError` before anything is written), `update` writes and returns a **view** of every K/V
# held, attention runs on the view, `advance` commits the new length. The view's `q_offset` is where this
# step's queries sit, its `lengths` how many keys each sequence has: exactly `minikv.attention`'s arguments.

# %%
store = minikv.cache.make_cache("static", n_layers=1, n_kv_heads=2, head_dim=4, batch_size=1, max_seq_len=8,
                                dtype="float64")
rng = np.random.default_rng(0)
all_k, all_v = [], []
for step in range(4):
    k_new, v_new = rng.standard_normal((2, 1, 2, 1, 4))       # (batch, kv_heads, 1 new position, head_dim)
    q = rng.standard_normal((1, 4, 1, 4))                     # 4 query heads share 2 kv heads (GQA)
    one = np.array([1])
    store.reserve(one)
    view = store.update(0, k_new, v_new)                     # write this step's K/V ...
    out = minikv.attention.naive(q, view.k, view.v, q_offset=view.q_offset, lengths=view.lengths)  # ... attend
    store.advance(one)
    all_k.append(k_new); all_v.append(v_new)
    recomputed = minikv.attention.naive(q, np.concatenate(all_k, 2), np.concatenate(all_v, 2), q_offset=step)
    assert np.allclose(out, recomputed, rtol=0, atol=1e-12)
    print(f"step {step}: view holds {view.k.shape[2]} positions, q_offset {view.q_offset.tolist()}, "
          f"lengths {view.lengths.tolist()}: equal to attention over every K/V written")

# %% [markdown]
# ## 1. Same tokens, three ways
#
# `cache="none"` recomputes the whole sequence for every new token (the baseline); `"concat"` grows the
# cache with `np.concatenate` (what most tutorials write); `"static"` allocates `max_seq_len` slots once
# and writes in place. Greedy decoding (`temperature=0.0`) must give the same tokens with all three.

# %%
prompt = "The meaning of life is"
outputs = {kind: model.generate(prompt, max_new_tokens=40, cache=kind, temperature=0.0)
           for kind in ["none", "concat", "static"]}
for kind, out in outputs.items():
    print(f"{kind:>7}: {out.text!r}")
    print(f"{'':>9}{out.stats}")
assert outputs["none"].tokens == outputs["concat"].tokens == outputs["static"].tokens

# %% [markdown]
# ## 2. The cost of one step, against the position
#
# We drive `model.forward` ourselves: prefill the prompt, then feed one token at a time. With a cache a
# step processes **one** token (plus attention over the cached keys); without one it processes the
# **whole** sequence so far. We time every step of both caches (taking turns, so a busy machine slows
# both alike), and the recompute step every 50 positions (it is the slow one). We also record the bytes
# `concat` has copied so far after each step.

# %%
prompt_ids = np.array([model.tokenizer.encode("A fortune: ")])
n_prompt = prompt_ids.shape[1]
n_steps = config.max_position_embeddings - n_prompt   # up to the 256 positions the model was trained on
total = n_prompt + n_steps

recompute_every = 50

def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start

caches = {kind: model.new_cache(kind, batch_size=1, max_seq_len=total) for kind in ["concat", "static"]}
logits = {kind: model.forward(prompt_ids, cache=cache, last_only=True) for kind, cache in caches.items()}
tokens = prompt_ids[0].tolist()
seconds = {kind: [] for kind in caches}
copied = []                                   # concat's cache.bytes_copied after each step
recompute_positions, recompute_seconds = [], []
for step in range(n_steps):
    token = int(logits["static"].argmax(-1)[0])          # greedy
    assert token == int(logits["concat"].argmax(-1)[0])  # both caches agree at every step
    tokens.append(token)
    for kind, cache in caches.items():        # the kinds take turns, so both see the same machine load
        logits[kind], sec = timed(lambda: model.forward(np.array([[token]]), cache=cache, last_only=True))
        seconds[kind].append(sec)
    copied.append(caches["concat"].bytes_copied)
    if step % recompute_every == 0 or step == n_steps - 1:
        # The same step without a cache: run the model on every position so far.
        full, sec = timed(lambda: model.forward(np.array([tokens]), last_only=True))
        assert np.allclose(full, logits["static"], atol=1e-3)
        recompute_positions.append(len(tokens) - 1)
        recompute_seconds.append(sec)

# %% [markdown]
# Now the plot: milliseconds per generated token against the position it is generated at.

# %%
positions = n_prompt + np.arange(n_steps)
window = 15
def smooth(x):
    """Median over a sliding window of steps: a single step is at the mercy of the OS scheduler."""
    return np.array([np.median(x[max(0, i - window):i + 1]) for i in range(len(x))])

plt.figure(figsize=(7, 4))
plt.plot(recompute_positions, np.array(recompute_seconds) * 1e3, "o-", label="none (recompute)")
for kind in caches:
    plt.plot(positions, smooth(np.array(seconds[kind])) * 1e3, label=f"{kind} cache")
plt.xlabel("position of the step")
plt.ylabel("ms per step")
plt.yscale("log")
plt.title("Cost of one decode step on the bundled model")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

print(f"{'position':>9} {'recompute ms':>13} {'static ms':>10} {'concat ms':>10}")
for p, sec in zip(recompute_positions, recompute_seconds):
    i = p - n_prompt                          # the step at position p
    nearby = slice(max(0, i - window), i + 1)
    print(f"{p:>9} {sec * 1e3:>13.2f} {np.median(seconds['static'][nearby]) * 1e3:>10.2f} "
          f"{np.median(seconds['concat'][nearby]) * 1e3:>10.2f}")

# %% [markdown]
# Recompute grows with the position (it redoes every earlier token: the total cost of `n` tokens is
# quadratic); the cached steps stay nearly flat, because at this size a step is dominated by reading
# the weights, not by attention over a few hundred keys.
#
# ## 3. What `concat` copies
#
# `np.concatenate([k_cache, k_new])` allocates a new array and copies the *whole* old cache into it, at
# every layer, for K and for V. Step `t` copies `t` positions' worth; `n` steps copy $O(n^2)$ bytes.
# The static cache writes one position in place and copies nothing.

# %%
copied = np.array(copied)
plt.figure(figsize=(6, 3.5))
plt.plot(positions, copied / 2**20, label="concat: bytes copied so far")
plt.plot(positions, np.zeros_like(positions), label="static: nothing copied")
plt.xlabel("position")
plt.ylabel("MiB copied (cumulative)")
plt.legend()
plt.grid(alpha=0.3)
plt.show()
print(f"concat copied {copied[-1] / 2**20:.1f} MiB to hold a cache of {caches['concat'].nbytes / 2**20:.2f} MiB")

# %% [markdown]
# ## 4. The memory formula
#
# A cache holding `positions` slots per sequence takes
#
# $$\text{nbytes} = 2\ (\text{K and V}) \times \text{layers} \times \text{batch} \times \text{positions} \times \text{kv\_heads} \times \text{head\_dim} \times \text{itemsize}.$$
#
# Note `kv_heads`, not `heads`: with grouped-query attention (8 query heads share 2 kv heads here) the
# cache is 4x smaller than with one kv head per query head. A `float16` cache halves it again.

# %%
rows = []
for batch, max_seq_len, dtype in [(1, 64, "float32"), (1, 512, "float32"), (4, 512, "float32"),
                                  (4, 512, "float16"), (8, 256, "float64")]:
    cache = model.new_cache("static", batch_size=batch, max_seq_len=max_seq_len, dtype=dtype)
    formula = (2 * config.n_layers * batch * max_seq_len * config.n_kv_heads * config.head_dim
               * np.dtype(dtype).itemsize)
    rows.append((batch, max_seq_len, dtype, formula, cache.nbytes))
    assert formula == cache.nbytes

print(f"| batch | max_seq_len | dtype | formula (bytes) | cache.nbytes |\n|---|---|---|---|---|")
for row in rows:
    print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:,} | {row[4]:,} |")

# %% [markdown]
# ## 5. Where caching does not pay
#
# Two implementation write-ups from other small projects make claims worth testing:
# a summary of a KV cache for a C# transformer (4 layers, 128 dimensions) reports *"13.2x faster"* when
# generating 50 tokens, and a summary of KV caching for a small PyTorch encoder-decoder reports the cache
# *"13-22% slower"* for sequences of 10 tokens or fewer (and turns caching off there). Neither number
# transfers automatically to another model and machine, so we measure ours: a 19-byte prompt, generating `n`
# tokens with `cache="none"` and `cache="static"` (the best of several runs, alternating the two).

# %%
prompt19 = "Once upon a time, a"
assert len(model.tokenizer.encode(prompt19)) == 19

def generate_seconds(kind, n_new):
    start = time.perf_counter()
    model.generate(prompt19, max_new_tokens=n_new, cache=kind, temperature=0.0)
    return time.perf_counter() - start

print(f"| new tokens | none (ms) | static (ms) | speedup of the cache |\n|---|---|---|---|")
speedups = {}
for n_new, repeats in [(1, 5), (2, 5), (4, 3), (16, 2), (50, 2)]:
    times = {"none": [], "static": []}
    for _ in range(repeats):                  # alternate, so both kinds see the same machine load
        for kind in times:
            times[kind].append(generate_seconds(kind, n_new))
    none_s, static_s = min(times["none"]), min(times["static"])
    speedups[n_new] = none_s / static_s
    print(f"| {n_new} | {none_s * 1e3:.1f} | {static_s * 1e3:.1f} | {speedups[n_new]:.2f}x |")

# %%
print(f"At 50 tokens the static cache is {speedups[50]:.1f}x faster than recomputing here "
      f"(the claim was 13.2x).")
print(f"Generating a single token, the cache's speedup is {speedups[1]:.2f}x.")
print("Lengths where the cache was slower than recomputing in this run:",
      [n for n, s in speedups.items() if s < 1.0] or "none")

# %% [markdown]
# What to take away:
#
# * With **one** new token there is nothing to reuse: the prompt's forward pass is the same with or
#   without a cache, so the cache can only add cost (allocating and writing K/V). "Cache is slower for
#   short sequences" is true in that degenerate case; compare the table for how short "short" is here.
# * The speedup grows with the number of tokens generated, because recompute's cost per step grows
#   with the position while the cached step stays flat. "13.2x at 50 tokens" depends on the prompt
#   length, the model size and the machine: here it is the number printed above.
# * Memory is the other cost: a static cache reserves `max_seq_len` slots up front whether they are
#   used or not (lesson 5's paged cache fixes that).
#
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/03_kv_cache.py`](solutions/03_kv_cache.py).
#
# **Exercise 1.** From `model.config` alone, compute the KV-cache bytes per position (one sequence, all
# layers, K and V) in float32 and in float16. Check against `cache.bytes_per_position()`.

# %%
# --- your solution ---
bytes_fp32 = ...   # K and V bytes per position, all layers, one sequence, float32
bytes_fp16 = ...   # the same in float16
# --- check ---
with check(1, bytes_fp32, bytes_fp16) as exercise:
    assert bytes_fp32 == model.new_cache("static", max_seq_len=8).bytes_per_position() == config.kv_bytes_per_token
    assert bytes_fp16 == model.new_cache("static", max_seq_len=8, dtype="float16").bytes_per_position()
    exercise.note = f"{bytes_fp32} bytes per position in float32, {bytes_fp16} in float16"

# %% [markdown]
# **Exercise 2.** A `concat` cache is prefilled with a prompt of `P` tokens and then decodes `n` tokens
# one at a time. Write the formula for `cache.bytes_copied` (each call copies the old K and V of every
# layer; the prefill call starts from an empty cache) and check it on a real run.

# %%
P, n = 7, 12

# --- your solution ---
predicted = ...   # bytes copied by the prefill call and n decode steps (an int)
# --- check ---
with check(2, predicted) as exercise:
    cache = model.new_cache("concat", max_seq_len=P + n)
    ids = np.arange(65, 65 + P + n)[None, :]
    model.forward(ids[:, :P], cache=cache)
    for t in range(P, P + n):
        model.forward(ids[:, t:t + 1], cache=cache)
    assert cache.bytes_copied == predicted
    exercise.note = f"{predicted:,} bytes"

# %% [markdown]
# **Exercise 3.** A static cache with `max_seq_len = 10` is prefilled with 8 tokens. Decode until it
# overflows and catch the `minikv.CacheOverflowError`. How many decode steps succeed? Check that the
# failed call left the cache's length unchanged (nothing is written before the check).

# %%
cache = model.new_cache("static", max_seq_len=10)
model.forward(np.arange(65, 73)[None, :], cache=cache)

# --- your solution ---
succeeded = ...   # decode steps that succeed before minikv.CacheOverflowError
message = ...     # str(error) of the overflow you caught
# --- check ---
with check(3, succeeded, message) as exercise:
    assert succeeded == 2
    assert cache.lengths.tolist() == [10]
    exercise.note = message
