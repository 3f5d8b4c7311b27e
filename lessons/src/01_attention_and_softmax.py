# Source of lessons/01_attention_and_softmax.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 1: attention and the softmax
#
# **What it teaches:** scaled dot-product attention by hand, the causal mask, why the textbook softmax
# overflows and the fix, the online softmax, tiled (flash) attention and its memory, measured.
# **What it assumes:** Python and NumPy (matrix products, broadcasting); what a softmax is. No
# transformer knowledge needed: this is the first lesson.
#
# Every token a transformer produces goes through **scaled dot-product attention**:
#
# $$\text{out}_i = \sum_j \text{softmax}_j(s_{ij})\, v_j, \qquad s_{ij} = \frac{q_i \cdot k_j}{\sqrt{d}}$$
#
# In this lesson you will
#
# 1. compute attention by hand on a tiny example and check it against `minikv.attention.naive`;
# 2. build the **causal mask** (a token may not look at the future), also for queries that start later;
# 3. watch the textbook softmax **overflow** and fix it;
# 4. derive the **online softmax** step by step (the running max `m`, the running sum `l`, the rescaling);
# 5. run **tiled (flash) attention** and count the blocks it skips;
# 6. **measure** the peak memory of naive versus tiled attention as the sequence grows.
#
# Everything runs on the CPU in a few seconds.

# %%
import math
import tracemalloc

import numpy as np
import matplotlib.pyplot as plt

from minikv import attention
from minikv.exercises import check

%matplotlib inline
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Attention by hand
#
# Four tokens, one head, `head_dim = 2`. minikv's shapes are `q: (batch, n_heads, seq, head_dim)` and
# `k, v: (batch, n_kv_heads, seq, head_dim)`, so we add two leading axes of size 1.

# %%
q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
k = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, -1.0]])
v = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]])
d = q.shape[-1]

scores = q @ k.T / math.sqrt(d)          # s_ij = q_i . k_j / sqrt(d): how well query i matches key j
print("scores s_ij (rows: queries, columns: keys)\n", scores)

# %% [markdown]
# Without a mask every query sees every key. The softmax turns each row of scores into weights that
# are positive and sum to 1; the output is the weighted average of the value rows.

# %%
weights = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
out_by_hand = weights @ v
print("weights (each row sums to 1)\n", weights)
print("output\n", out_by_hand)

out_minikv = attention.naive(q[None, None], k[None, None], v[None, None], causal=False)
print("max |by hand - minikv| =", np.abs(out_by_hand - out_minikv[0, 0]).max())
assert np.allclose(out_by_hand, out_minikv[0, 0], atol=1e-12)

# %% [markdown]
# ## 2. The causal mask
#
# A language model predicts token `i + 1` from tokens `0..i`, so query `i` may only see keys `j <= i`.
# The mask is applied to the scores *before* the softmax by setting the hidden ones to $-\infty$
# (their weight becomes $e^{-\infty} = 0$).

# %%
causal = np.tril(np.ones((4, 4), dtype=bool))          # True where key j <= query i
masked_scores = np.where(causal, scores, -np.inf)
causal_weights = np.exp(masked_scores) / np.exp(masked_scores).sum(axis=1, keepdims=True)
print("causal weights\n", causal_weights)

out_causal = attention.naive(q[None, None], k[None, None], v[None, None], causal=True)
assert np.allclose(causal_weights @ v, out_causal[0, 0], atol=1e-12)

# minikv builds the same mask from absolute positions:
print(attention.visible_mask(4, 4)[0, 0, 0].astype(int))

# %% [markdown]
# During generation the queries do not start at position 0: after 4 cached tokens, 2 new queries sit at
# positions 4 and 5 and see keys `0..4` and `0..5`. That is the `q_offset` argument. A sliding `window`
# (Mistral) additionally hides keys more than `window - 1` positions back.

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
for ax, (title, mask) in zip(axes, [
    ("causal, 6 queries x 6 keys", attention.visible_mask(6, 6)),
    ("q_offset=4: 2 new queries x 6 keys", attention.visible_mask(2, 6, q_offset=4)),
    ("causal + window=3", attention.visible_mask(6, 6, window=3)),
]):
    ax.imshow(mask[0, 0, 0], cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The textbook softmax overflows
#
# $\text{softmax}(x)_j = e^{x_j} / \sum_i e^{x_i}$ is fine on paper. But `exp(89)` is already infinite in
# float32 (and `exp(710)` in float64), and `inf / inf = nan`. Scores that large are not exotic: a
# dot product of two 128-dimensional vectors with entries around 3 is about 1000.

# %%
rows = []
for top in [10.0, 80.0, 89.0, 100.0, 1000.0]:
    x = np.array([top - 2, top - 1, top], dtype=np.float32)
    rows.append((top, attention.naive_softmax(x), attention.stable_softmax(x)))
print(f"{'largest score':>14} | {'naive_softmax (float32)':>34} | {'stable_softmax (float32)':>34}")
for top, naive_p, stable_p in rows:
    print(f"{top:>14} | {np.array2string(naive_p, precision=4):>34} | {np.array2string(stable_p, precision=4):>34}")

# %% [markdown]
# The fix: $\text{softmax}(x) = \text{softmax}(x - m)$ for any constant $m$, because $e^{-m}$ cancels
# between numerator and denominator. With $m = \max_j x_j$ every exponent is $\le 0$, the largest term is
# exactly $e^0 = 1$, nothing overflows and the sum is at least 1.
#
# ## 4. The online softmax, step by step
#
# The stable softmax needs the maximum *before* it can exponentiate: two passes over the row (or the
# whole row in memory). The **online softmax** does it in one pass, keeping two running numbers per row:
#
# * `m`: the largest score seen so far,
# * `l`: $\sum_{j \text{ seen}} e^{s_j - m}$, the sum of exponentials *relative to the current* `m`.
#
# When a new score $s$ arrives: $m_{new} = \max(m, s)$, and the old sum must be re-expressed relative to
# the new maximum, $l \leftarrow l \cdot e^{m - m_{new}} + e^{s - m_{new}}$. At the end,
# $\log \sum_j e^{s_j} = m + \log l$ (the **log-sum-exp**, `lse`), and $p_j = e^{s_j - lse}$.

# %%
s = np.array([1.0, 3.0, 2.0, 7.0, 0.5, 6.0])
m, l = -np.inf, 0.0
print(f"{'step':>4} {'score':>6} {'m':>6} {'rescale exp(m-m_new)':>21} {'l':>10}")
for step, score in enumerate(s):
    m_new = max(m, score)
    rescale = math.exp(m - m_new)            # = 0 on the first step (m = -inf), <= 1 always
    l = l * rescale + math.exp(score - m_new)
    m = m_new
    print(f"{step:>4} {score:>6} {m:>6} {rescale:>21.4f} {l:>10.4f}")

lse_online = m + math.log(l)
lse_exact = math.log(np.exp(s).sum())
print("online lse:", lse_online, "  exact log(sum(exp(s))):", lse_exact)
assert abs(lse_online - lse_exact) < 1e-12

# %% [markdown]
# Attention needs one more running quantity: the unnormalised output $acc = \sum_j e^{s_j - m} v_j$,
# rescaled by the same factor. Here it is for a whole sequence of queries at once, one key at a time,
# written by hand and then compared with `minikv.attention.online` (which is the same loop, plus
# masks, GQA and batches) and with `naive`.

# %%
def online_attention_by_hand(q, k, v):
    """q (seq_q, d), k and v (seq_k, d); causal. One pass over the keys, never a row of scores."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = np.full((q.shape[0], 1), -np.inf)
    l = np.zeros((q.shape[0], 1))
    acc = np.zeros((q.shape[0], v.shape[-1]))
    for j in range(k.shape[0]):
        s_j = (q @ k[j])[:, None] * scale                       # this key's score for every query
        s_j = np.where(np.arange(q.shape[0])[:, None] >= j, s_j, -np.inf)   # causal: query i sees j <= i
        m_new = np.maximum(m, s_j)
        shift = np.where(np.isfinite(m_new), m_new, 0.0)        # rows that saw nothing yet stay at 0
        rescale, p_j = np.exp(m - shift), np.exp(s_j - shift)
        l = l * rescale + p_j
        acc = acc * rescale + p_j * v[j]
        m = m_new
    return acc / l

rng = np.random.default_rng(0)
q8, k8, v8 = (rng.standard_normal((1, 1, 8, 4)) for _ in range(3))
mine = online_attention_by_hand(q8[0, 0], k8[0, 0], v8[0, 0])
print("max |by hand - attention.online| =", np.abs(mine - attention.online(q8, k8, v8)[0, 0]).max())
print("max |by hand - attention.naive|  =", np.abs(mine - attention.naive(q8, k8, v8)[0, 0]).max())
assert np.allclose(mine, attention.naive(q8, k8, v8)[0, 0], atol=1e-12)

# %% [markdown]
# ## 5. Tiled (flash) attention
#
# The online softmax works just as well with a *block* of keys at a time: take the block's row maximum
# instead of one score. Flash attention also cuts the queries into blocks, so only a
# `block_q x block_k` tile of scores ever exists. With a causal mask, a key block that lies entirely
# above the diagonal is never computed at all. `attention.tiled` reports what it did through `stats`.

# %%
q, k, v = (rng.standard_normal((1, 2, 512, 32)).astype(np.float32) for _ in range(3))
reference = attention.naive(q, k, v)
print(f"{'block':>6} {'computed':>9} {'skipped':>8} {'masked':>7} {'max |tiled - naive|':>20}")
for block in [512, 256, 128, 64, 32]:
    stats = {}
    out = attention.tiled(q, k, v, block_q=block, block_k=block, stats=stats)
    assert out.dtype == np.float32
    err = np.abs(out - reference).max()
    print(f"{block:>6} {stats['blocks_computed']:>9} {stats['blocks_skipped']:>8} "
          f"{stats['blocks_masked']:>7} {err:>20.2e}")

# %% [markdown]
# With `n` blocks per side, the causal tiles computed are $n(n+1)/2$ of $n^2$: the skipped fraction tends
# to one half, and only the $n$ diagonal tiles need a mask at all. The error stays at float32 round-off.
#
# ## 6. Peak memory: naive versus tiled
#
# `naive` materialises the whole `seq x seq` score matrix per head (plus the mask and the
# exponentials); `tiled` never holds more than one tile. We measure the peak of NumPy's allocations with
# `tracemalloc` (NumPy reports its array memory to it).

# %%
def peak_mib(fn, *args, **kwargs):
    tracemalloc.start()
    fn(*args, **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20

seqs = [128, 256, 512, 1024, 2048]
table = []
for seq in seqs:
    q, k, v = (rng.standard_normal((1, 2, seq, 32)).astype(np.float32) for _ in range(3))
    table.append((seq, peak_mib(attention.naive, q, k, v),
                  peak_mib(attention.tiled, q, k, v, block_q=256, block_k=256)))

print(f"{'seq':>6} {'naive peak MiB':>15} {'tiled peak MiB':>15} {'scores alone MiB':>17}")
for seq, naive_mib, tiled_mib in table:
    print(f"{seq:>6} {naive_mib:>15.2f} {tiled_mib:>15.2f} {2 * seq * seq * 4 / 2**20:>17.2f}")

plt.figure(figsize=(6, 4))
plt.plot(seqs, [t[1] for t in table], "o-", label="naive (whole score matrix)")
plt.plot(seqs, [t[2] for t in table], "s-", label="tiled, 256 x 256 tiles")
plt.xscale("log", base=2)
plt.yscale("log")
plt.xlabel("sequence length")
plt.ylabel("peak memory (MiB)")
plt.title("Attention peak memory, 2 heads, head_dim 32, float32")
plt.legend()
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# Naive grows 4x each time the sequence doubles (quadratic); tiled grows only with the inputs and the
# output (linear). That is the whole point of flash attention: the same numbers, without the
# `seq x seq` matrix. (On a GPU it is also faster, because the tile lives in fast on-chip memory; in
# NumPy the Python loop over tiles costs time, which is why minikv's NumPy backend uses `naive` by
# default for the short prompts of generation.)
#
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/01_attention_and_softmax.py`](solutions/01_attention_and_softmax.py).
#
# **Exercise 1.** Build the mask of a sliding window of `W = 3` over 6 positions *by hand* (causal, and
# query `i` sees key `j` only if `i - j < W`), use it to compute attention with NumPy only, and check that
# it equals `attention.naive(..., window=3)`.

# %%
W = 3
q6, k6, v6 = (rng.standard_normal((6, 4)) for _ in range(3))

# --- your solution ---
window_mask = ...   # (6, 6) bool: True where query i may attend to key j
out_window = ...    # (6, 4): softmax(q6 k6^T / sqrt(4), masked) @ v6, with NumPy only
# --- check ---
with check(1, window_mask, out_window):
    assert window_mask.sum() == 1 + 2 + 3 + 3 + 3 + 3
    assert np.allclose(out_window, attention.naive(q6[None, None], k6[None, None], v6[None, None], window=W)[0, 0],
                       atol=1e-12)

# %% [markdown]
# **Exercise 2.** Attention over a set of keys can be computed in two halves and merged. Compute
# non-causal attention of `q` against the first 10 keys and against the last 10 keys separately, each
# with `return_lse=True`, then merge the two `(out, lse)` pairs with the formula
# $lse = \log(e^{lse_1} + e^{lse_2})$, $out = e^{lse_1 - lse}\, out_1 + e^{lse_2 - lse}\, out_2$.
# Check it equals attention over all 20 keys.

# %%
qx = rng.standard_normal((1, 2, 5, 8))
kx, vx = rng.standard_normal((1, 2, 20, 8)), rng.standard_normal((1, 2, 20, 8))

# --- your solution ---
out_merged = ...   # (1, 2, 5, 8): attention over keys 0..9 and over keys 10..19, merged by the formula
lse_merged = ...   # (1, 2, 5): the merged log-sum-exp
# --- check ---
with check(2, out_merged, lse_merged):
    full_out, full_lse = attention.naive(qx, kx, vx, causal=False, return_lse=True)
    assert np.allclose(out_merged, full_out, atol=1e-12) and np.allclose(lse_merged, full_lse, atol=1e-12)

# %% [markdown]
# **Exercise 3.** Find the smallest integer `x` for which `np.exp(np.float32(x))` is infinite, and the
# same for float64. (These are the score sizes at which the textbook softmax breaks.)

# %%
# --- your solution ---
first_inf_32 = ...   # smallest integer x with np.exp(np.float32(x)) == inf
first_inf_64 = ...   # the same for np.float64
# --- check ---
with check(3, first_inf_32, first_inf_64) as exercise:
    assert first_inf_32 == math.floor(math.log(np.finfo(np.float32).max)) + 1 == 89
    assert first_inf_64 == math.floor(math.log(np.finfo(np.float64).max)) + 1 == 710
    exercise.note = "float32 overflows at exp(%d), float64 at exp(%d)" % (first_inf_32, first_inf_64)
