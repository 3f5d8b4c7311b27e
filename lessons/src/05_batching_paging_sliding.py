# Source of lessons/05_batching_paging_sliding.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 5: batching, paging and sliding windows
#
# **What it teaches:** ragged batches and their padding, the paged KV cache and its block table, the
# sliding-window ring buffer, and the memory each cache kind holds, measured.
# **What it assumes:** lessons 3 (the KV cache) and 4 (generation); lesson 1's sliding-window mask.
#
# A server answers many prompts at once. Three problems appear, and this lesson measures each:
#
# 1. **Ragged batches.** Prompts have different lengths; stacking them in one array means padding.
#    How much is wasted, and does every sequence still get exactly the tokens it would get alone?
# 2. **Paged caches.** A static cache reserves `max_seq_len` slots per sequence up front. vLLM's
#    PagedAttention instead hands out fixed-size *blocks* from a shared pool as sequences grow; a
#    **block table** says where each sequence's positions live.
# 3. **Sliding windows.** Mistral attends only to the last `W` positions, so the cache can be a
#    **ring buffer** of `W` slots: memory stays constant however long the text gets.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minikv
from minikv.backend import gather_pages
from minikv.exercises import check

%matplotlib inline

model = minikv.load()
tokenizer = model.tokenizer
print(model)

# %% [markdown]
# ## 1. A ragged batch and its padding
#
# Four prompts of different lengths are right-padded to the longest. `model.forward(ids, n_new=...)`
# tells the model how many tokens of each row are real; each row keeps its own positions and its own
# cache length. The padding still costs compute in the prefill matmuls.

# %%
prompts = ["Hi.", "Never trust a computer you can't throw out a window.", "To be, or not to be",
           "Time flies like an arrow."]
lengths = np.array([len(tokenizer.encode(p)) for p in prompts])
padded_width = lengths.max()
real = np.arange(padded_width)[None, :] < lengths[:, None]           # True where a token is real

waste = 1 - real.sum() / real.size
print(f"lengths {lengths.tolist()}, padded to {padded_width}: {real.size} slots, {real.sum()} real, "
      f"{waste:.0%} padding")

plt.figure(figsize=(8, 2.2))
plt.imshow(real, cmap="Greens", aspect="auto", vmin=0, vmax=1.2)
plt.yticks(range(len(prompts)), [f"prompt {i} ({n} tokens)" for i, n in enumerate(lengths)])
plt.xlabel("position")
plt.title(f"prefill batch: dark = real token, white = padding ({waste:.0%} wasted)")
plt.show()

# %% [markdown]
# Sorting prompts by length and batching similar lengths together reduces the waste; continuous
# batching servers go further and never pad decode steps. Now the correctness check that matters:
# **batched == one by one**, token for token (greedy), for two cache kinds.

# %%
alone = [model.generate(p, max_new_tokens=24, temperature=0.0).tokens[0] for p in prompts]
for kind in ["static", "paged"]:
    batched = model.generate(prompts, max_new_tokens=24, temperature=0.0, cache=kind)
    assert batched.tokens == alone, kind
    print(f"{kind}: the batch of {len(prompts)} produced exactly the tokens each prompt produces alone")
for prompt, text in zip(prompts, batched.text):
    print(f"  {prompt!r:>60} -> {text!r}")

# %% [markdown]
# ## 2. The paged cache and its block table
#
# A pool of `num_blocks` blocks of `block_size` positions is shared by the whole batch.
# `block_table[b, i]` is the pool block that holds positions `i*block_size .. (i+1)*block_size - 1` of
# sequence `b` (`-1`: none yet). Blocks are taken from the free list only when a sequence crosses into
# a new block, and `cache.free(b)` gives them back.

# %%
block_size = 8
cache = model.new_cache("paged", batch_size=len(prompts), max_seq_len=96, block_size=block_size, num_blocks=40)
ids = np.zeros((len(prompts), padded_width), dtype=np.int64)
for b, p in enumerate(prompts):
    ids[b, :lengths[b]] = tokenizer.encode(p)

logits = model.forward(ids, cache=cache, n_new=lengths, last_only=True)      # prefill, ragged
for _ in range(12):                                                             # 12 greedy decode steps
    logits = model.forward(logits.argmax(-1)[:, None], cache=cache, last_only=True)

def draw_table(cache, title):
    table = cache.block_table
    used_cols = max(1, int((table >= 0).any(axis=0).sum()))
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * used_cols, 0.5 + 0.45 * table.shape[0]))
    ax.imshow(table[:, :used_cols] >= 0, cmap="Blues", vmin=0, vmax=1.6, aspect="auto")
    for b in range(table.shape[0]):
        for i in range(used_cols):
            if table[b, i] >= 0:
                ax.text(i, b, int(table[b, i]), ha="center", va="center")
    ax.set_yticks(range(table.shape[0]), [f"seq {b}: {n} pos" for b, n in enumerate(cache.lengths)])
    ax.set_xticks(range(used_cols), [f"{i * block_size}-{(i + 1) * block_size - 1}" for i in range(used_cols)],
                  fontsize=7)
    ax.set_xlabel("positions (logical block)")
    ax.set_title(title, fontsize=10)
    plt.show()

draw_table(cache, "block table: the pool block holding each logical block")
print(f"lengths {cache.lengths.tolist()}, blocks in use {cache.blocks_in_use} of {cache.num_blocks}, "
      f"free: {cache.free_blocks[:6]}...")
print(f"memory held: {cache.nbytes / 1024:.0f} KiB; a static cache for the same batch and max_seq_len "
      f"would hold {model.new_cache('static', batch_size=4, max_seq_len=96).nbytes / 1024:.0f} KiB")

# %% [markdown]
# Sequence 1 finishes: `free(1)` returns its blocks to the pool, and a new prompt can start in that row.
# Its blocks come from wherever the free list points: a sequence's blocks need not be contiguous in
# the pool, which is the whole point: any free block serves any sequence (no *external* fragmentation: a
# free block is never too small or in the wrong place), and a growing sequence takes one more block
# instead of being copied.

# %%
cache.free(1)
new_prompt = tokenizer.encode("Why did the chicken cross the road?")
new_ids = np.zeros((len(prompts), len(new_prompt)), dtype=np.int64)
new_ids[1] = new_prompt
model.forward(new_ids, cache=cache, n_new=np.array([0, len(new_prompt), 0, 0]))   # prefill row 1 only
draw_table(cache, "after free(1) and a new prompt in row 1")

# %% [markdown]
# Paging still wastes some memory: **internal fragmentation**. A sequence of `n` positions holds
# `ceil(n / block_size)` blocks, and its last block is partly empty: up to `block_size - 1` unused slots
# per sequence (the partly filled last columns in the drawing). Measured on this cache:

# %%
held = np.array([-(-n // block_size) * block_size for n in cache.lengths])       # slots in held blocks
unused = held - cache.lengths
print("| sequence | positions | slots held | unused in its last block |\n|---|---|---|---|")
for b_i, (n, h, u) in enumerate(zip(cache.lengths, held, unused)):
    print(f"| {b_i} | {n} | {h} | {u} |")
print(f"\n{unused.sum()} of {held.sum()} slots held are unused ({unused.sum() / held.sum():.1%}); "
      f"at most block_size - 1 = {block_size - 1} per sequence, so smaller blocks waste less (but make the "
      f"block table longer and each read shorter)")
assert np.all(unused < block_size) and held.sum() == cache.blocks_in_use * block_size

# %% [markdown]
# Attention reads K and V *through* the table. The reference kernel gathers each sequence's blocks into a
# contiguous view (`minikv.backend.gather_pages`); a GPU kernel would follow the table directly. Either way,
# position `p` of sequence `b` lives in pool block `block_table[b, p // block_size]` at offset `p % block_size`.

# %%
layer, b, p = 0, 3, 37
block, offset = cache.block_table[b, p // block_size], p % block_size
contiguous = gather_pages(cache.k_pool[layer], cache.block_table)     # (batch, kv_heads, positions, head_dim)
assert np.array_equal(contiguous[b, :, p], cache.k_pool[layer][block, :, offset])
print(f"position {p} of sequence {b}: pool block {block}, offset {offset}")

# %% [markdown]
# This is what the model gets from a paged cache at every layer: `view = cache.update(layer, k, v)` writes
# the step's K/V into the blocks and returns the **pools and the block table** (not a copy): `view.k` is the
# pool, `view.block_table` the columns that hold positions, `view.lengths` the keys per sequence. The
# model then calls the backend's paged attention on it, and only there are the blocks read.

# %%
print(f"pool {cache.k_pool[0].shape} = (num_blocks, kv_heads, block_size, head_dim); "
      f"table {cache.block_table.shape} = (batch, blocks_per_seq)")

# %% [markdown]
# ## 3. The sliding window as a ring buffer
#
# With a window of `W`, position `p` attends only to positions `p-W+1 .. p`. The cache then needs only
# `W` slots: position `p` lives in slot `p mod W`, overwriting position `p - W`, which nobody will read
# again. Attention does not care in which order the keys lie (RoPE already rotated each key by its own
# position), so decode attends to the ring as it is.
#
# The bundled model was trained with full attention, so we *choose* a window here (`W = 16`). The check:
# decoding with a 16-slot ring gives the same logits as recomputing with `window=16`.

# %%
W = 16
text_ids = np.array([tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again.")])
n_total = text_ids.shape[1]

ring = model.new_cache("sliding", max_seq_len=n_total, window=W)
model.forward(text_ids[:, :4], cache=ring)                                       # prefill 4
decoded = [model.forward(text_ids[:, t:t + 1], cache=ring)[0, -1] for t in range(4, n_total)]
recomputed = model.forward(text_ids, window=W)[0, 4:]                            # no cache, window mask
err = np.abs(np.array(decoded) - recomputed).max()
print(f"{n_total} positions through a {W}-slot ring: max |ring decode - windowed recompute| = {err:.1e}")
assert err < 1e-3

slots = np.arange(W)
holds = [max(p for p in range(n_total) if p % W == s) for s in slots]
print("slot:           ", " ".join(f"{s:>3}" for s in slots))
print("holds position: ", " ".join(f"{p:>3}" for p in holds))

# %% [markdown]
# Memory held as a sequence grows, for each cache kind (all sized for 512 positions, float32):

# %%
positions = np.arange(1, 513)
per_position = model.new_cache("static", max_seq_len=8).bytes_per_position()
memory = {
    "static (reserves max_seq_len)": np.full_like(positions, 512) * per_position,
    "concat (exactly what it holds)": positions * per_position,
    "paged, block_size 16 (whole blocks)": -(-positions // 16) * 16 * per_position,
    "sliding, W = 64 (ring)": np.full_like(positions, 64) * per_position,
}
plt.figure(figsize=(7, 4))
for name, held in memory.items():
    plt.plot(positions, held / 1024, label=name)
plt.xlabel("positions in the sequence")
plt.ylabel("KV cache held (KiB)")
plt.title("memory per sequence, bundled model")
plt.legend(fontsize=8)
plt.grid(alpha=0.3)
plt.show()

# the curves are the formula; check two points against real caches
paged = model.new_cache("paged", max_seq_len=512, block_size=16)
model.forward(np.full((1, 37), 65), cache=paged)
assert paged.nbytes == memory["paged, block_size 16 (whole blocks)"][36]
assert model.new_cache("sliding", max_seq_len=512, window=64).nbytes == memory["sliding, W = 64 (ring)"][0]

# %% [markdown]
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/05_batching_paging_sliding.py`](solutions/05_batching_paging_sliding.py).
#
# **Exercise 1.** For prompts of lengths `[3, 50, 7, 12, 48, 5]`, compute the fraction of padding when they
# are prefilled as one batch, and when they are sorted by length and prefilled as two batches of three.

# %%
lens = np.array([3, 50, 7, 12, 48, 5])

# --- your solution ---
one_batch = ...     # fraction of padded slots: all six prompts in one batch
two_batches = ...   # the same: sorted by length, two batches of three
# --- check ---
with check(1, one_batch, two_batches) as exercise:
    assert abs(one_batch - (1 - 125 / 300)) < 1e-12
    assert abs(two_batches - (1 - 125 / (3 * 7 + 3 * 50))) < 1e-12
    exercise.note = f"one batch wastes {one_batch:.0%}, two sorted batches {two_batches:.0%}"

# %% [markdown]
# **Exercise 2.** Using only `cache.block_table` and `block_size`, read the value vector of position 20 of
# sequence 0 at layer 2 from `cache.v_pool[2]`, and check it against a *static* cache run on the same prompt.

# %%
prompt_ids = np.array([tokenizer.encode("Lorem ipsum dolor sit amet, consectetur")])
paged = model.new_cache("paged", max_seq_len=64, block_size=8)
static = model.new_cache("static", max_seq_len=64)
model.forward(prompt_ids, cache=paged)
model.forward(prompt_ids, cache=static)

# --- your solution ---
pos = 20
v_from_pages = ...   # (kv_heads, head_dim): position 20 of sequence 0, layer 2, read through the block table
# --- check ---
with check(2, v_from_pages):
    assert np.allclose(v_from_pages, static.v[2][0, :, pos], atol=1e-6)

# %% [markdown]
# **Exercise 3.** A ring of `W = 16` slots has seen 40 positions. Which slot holds position 37, and which
# position does slot 3 hold? Check your answers against the ring's K at layer 0 and a static cache's K.

# %%
ids40 = np.array([tokenizer.encode("abcdefghijklmnopqrstuvwxyz0123456789ABCD")])
assert ids40.shape[1] == 40
ring = model.new_cache("sliding", max_seq_len=40, window=16)
static = model.new_cache("static", max_seq_len=40)
for t in range(40):                       # decode one by one, so the ring wraps around twice
    model.forward(ids40[:, t:t + 1], cache=ring, window=16)
    model.forward(ids40[:, t:t + 1], cache=static, window=16)

# --- your solution ---
slot_of_37 = ...           # the ring slot that holds position 37
position_in_slot_3 = ...   # the position that slot 3 holds
# --- check ---
with check(3, slot_of_37, position_in_slot_3) as exercise:
    assert np.allclose(ring.k[0][0, :, slot_of_37], static.k[0][0, :, 37], atol=1e-6)
    assert np.allclose(ring.k[0][0, :, 3], static.k[0][0, :, position_in_slot_3], atol=1e-6)
    exercise.note = f"position 37 is in slot {slot_of_37}, slot 3 holds position {position_in_slot_3}"
