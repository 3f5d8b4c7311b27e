# Source of lessons/09_serving.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 9: serving many requests: continuous batching and prefix caching
#
# **What it teaches:** continuous batching, K/V in a pool of blocks, prefix caching by hash chains,
# copy-on-write, each checked against generating every request alone. **What it assumes:** lessons
# 3-5 (the KV cache, generation, the paged cache).
#
# A server does not get one prompt; it gets a stream of requests that arrive and finish at different
# times, and many of them start with the same text (a system prompt). Lesson 5 batched prompts that
# start together. This lesson builds what engines like vLLM do instead, with `minikv.serving`:
#
# 1. **Continuous batching.** Every step, the scheduler picks tokens from *every* live request (one for
#    a request that is decoding, a chunk for one whose prompt is still being read) up to a token
#    budget, and the model runs them all in *one* forward. A request joins at the next step and leaves
#    the moment it is done.
# 2. **The block table.** K/V live in one pool of fixed-size blocks; each sequence has a table of the
#    blocks holding its positions.
# 3. **Prefix caching.** A full block is named by a hash chain of its tokens; a new request whose
#    prompt starts like an earlier one takes those blocks instead of recomputing them.
# 4. **Copy-on-write.** A block read by several sequences is copied before one of them writes into it.
#
# Everything is checked against the plain `model.generate` of each prompt alone.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minikv
from minikv.serving import BlockManager, Engine, block_hash
from minikv.exercises import check

%matplotlib inline

model = minikv.load()
tokenizer = model.tokenizer
print(model)

# %% [markdown]
# ## 1. One step of continuous batching, by hand
#
# Three requests; the token budget is 12 tokens per step. Watch what each step runs: the first steps
# read the prompts in chunks (prefill), then every step runs one token of each request (decode), and a
# request that arrives late (step 4) is read in the same forward as the others' decodes.

# %%
engine = Engine(model, block_size=4, max_num_tokens=12)
texts = {"a": "Once upon a time", "b": "The meaning of life is", "c": "Hi"}
engine.add_request(tokenizer.encode(texts["a"]), max_tokens=6, request_id="a")
engine.add_request(tokenizer.encode(texts["b"]), max_tokens=6, request_id="b")
served = {"a": [], "b": [], "c": []}
step = 0
print("step | what ran (request: first position + tokens)")
while engine.has_unfinished() or step < 4:
    if step == 4:
        engine.add_request(tokenizer.encode(texts["c"]), max_tokens=6, request_id="c")
    for out in engine.step():
        served[out.request_id] += out.new_token_ids
    ran = ", ".join(f"{r}: {start}+{n}" for r, _, start, n in engine.last_step)
    print(f"{step:4d} | {ran}   ({sum(n for *_, n in engine.last_step)} tokens in one forward)")
    step += 1

for name, text in texts.items():
    alone = model.generate(text, max_new_tokens=6, temperature=0.0).tokens[0]
    print(f"{name}: served {tokenizer.decode(served[name])!r}, alone {tokenizer.decode(alone)!r}")
    assert served[name] == alone

# %% [markdown]
# How does *one* forward run a chunk of 12 prompt tokens of one request and single decode tokens of
# others? The step is flattened into T rows of **one token each**. Row r carries its token, its position,
# and the block table of its sequence. Each layer first writes every row's K/V into the pool, then every
# row attends to its own sequence's positions `0..position` through its block table. The second token of
# a chunk sees the first one's K/V because the write happened before the attention: the causal mask
# inside a chunk comes out of the positions alone, and there is no padding anywhere.
#
# That is the math, row by row. The store also tells the backend which rows are one sequence's chunk
# (`segments`, flash-attention's `cu_seqlens`), so the backend does the same work cheaper: a chunk of n
# rows attends as one causal block over its sequence's blocks read once (not n times), and the decode
# rows attend together (`Backend.ragged_paged_attention`; tests/test_backends.py proves it equal to
# the rows alone).
#
# ## 2. The block table
#
# The pool here has blocks of 4 positions. A sequence of 10 tokens needs `ceil(10 / 4) = 3` blocks; which
# blocks it gets does not matter, only the table does. `BlockManager` hands out ids and counts who uses
# each; it never touches K/V.

# %%
class Seq:                         # what the block manager needs of a sequence
    def __init__(self, tokens):
        self.token_ids, self.num_computed, self.block_table, self.block_hashes = list(tokens), 0, [], []


blocks = BlockManager(num_blocks=8, block_size=4)
first = Seq(range(10))
blocks.write_blocks(first, 10)         # room for positions 0..9
first.num_computed = 10
blocks.register_full_blocks(first)     # the two full blocks get their hashes
print("block table of the first sequence:", first.block_table)
print("ref counts:", blocks.ref_count)
print("position 9 lives in block", first.block_table[9 // 4], "at offset", 9 % 4)

# %% [markdown]
# ## 3. The hash chain
#
# Block i is named `h_i = sha256(h_{i-1} || tokens of block i)`. Why the parent? The K/V of a block depend
# on every token before it (attention mixed them in, and RoPE rotated them by their positions). The same
# four tokens after a different prefix are different K/V, so they must get a different name:

# %%
h0 = block_hash(None, [0, 1, 2, 3])
h1 = block_hash(h0, [4, 5, 6, 7])
print("h0 =", h0.hex()[:16], "...  h1 =", h1.hex()[:16], "...")
print("same tokens 4..7 as a first block:", block_hash(None, [4, 5, 6, 7]).hex()[:16], "... (different)")
assert block_hash(None, [4, 5, 6, 7]) != h1

# A second sequence sharing the first 8 tokens takes both cached blocks and computes only the rest.
second = Seq(list(range(8)) + [42, 43, 44])
second.num_computed = blocks.take_cached_prefix(second)
print("second sequence: cached tokens", second.num_computed, "table", second.block_table)
print("ref counts:", blocks.ref_count)

# %% [markdown]
# Now in the engine, with a shared "system prompt". The second request computes only its own tokens;
# both answers equal `generate` alone.

# %%
engine = Engine(model, block_size=8)
system = "You are a fortune cookie. Answer in one short sentence. "
questions = ["Will I be rich?", "Should I travel?"]
for q in questions:
    before = engine.stats.scheduled_tokens
    out = engine.generate([tokenizer.encode(system + q)], max_tokens=30)[0]
    computed = engine.stats.scheduled_tokens - before
    print(f"{q!r}: ran {computed} tokens for a prompt of {len(tokenizer.encode(system + q))} + 30 new "
          f"-> {tokenizer.decode(out)!r}")
    assert out == model.generate(system + q, max_new_tokens=30, temperature=0.0).tokens[0]
stats = engine.blocks.stats
print(f"hit rate {stats.hit_rate:.0%}, blocks shared {stats.shared_blocks}, evictions {stats.evictions}")

# %% [markdown]
# ## 4. Copy-on-write
#
# Ask for `n = 2` answers of one prompt. After the prompt is read, the second answer *forks* the first:
# it shares every block, including the last, half-full one (ref count 2). The next token of each answer
# goes into that shared block, at the same offset, and they are different tokens. So before writing, each
# writer of a shared block gets its own copy. Each answer then equals `generate` with its own seed.

# %%
engine = Engine(model, block_size=8)
prompt = tokenizer.encode("Once upon a time there")    # 22 tokens: blocks 0 and 1 full, block 2 holds 6
engine.add_request(prompt, max_tokens=20, temperature=0.8, seed=3, n=2, request_id="fork")
answers = {0: [], 1: []}
for out in engine.step():                              # reads the prompt, samples each answer's first token
    answers[out.index] += out.new_token_ids
seqs = engine.requests["fork"]
print("after the fork:      tables", [s.block_table for s in seqs], "ref counts",
      [[engine.blocks.ref_count[b] for b in s.block_table] for s in seqs])
for out in engine.step():                              # each answer writes its token at position 22
    answers[out.index] += out.new_token_ids
print("after the next step: tables", [s.block_table for s in seqs], "ref counts",
      [[engine.blocks.ref_count[b] for b in s.block_table] for s in seqs],
      "copies made:", engine.blocks.stats.cow_copies)
while engine.has_unfinished():
    for out in engine.step():
        answers[out.index] += out.new_token_ids
for i in range(2):
    alone = model.generate(prompt, max_new_tokens=20, temperature=0.8, seed=3 + i).tokens[0]
    assert answers[i] == alone
    print(f"answer {i}: {tokenizer.decode(alone)!r}")

# %% [markdown]
# ## 5. Throughput against concurrency
#
# The same 12 requests, with at most 1, 2, 4, 6 or 12 of them in the batch at once. A decode step
# reads every weight once however many sequences it runs, so more sequences per step means more tokens
# per weight read, until the matmuls become compute-bound. (The `mid` model, 14x larger, in
# `benchmarks/results/serving.md`.)

# %%
rng = np.random.default_rng(0)
workload = [(rng.integers(32, 127, size=int(rng.integers(8, 32))).tolist(), 16) for _ in range(12)]
reference = None
concurrency, throughput = [1, 2, 4, 6, 12], []
for c in concurrency:
    engine = Engine(model, max_num_seqs=c, max_num_tokens=256)
    t0 = time.perf_counter()
    out = engine.generate([p for p, _ in workload], max_tokens=16, stop_token_ids=[])
    throughput.append(sum(len(o) for o in out) / (time.perf_counter() - t0))
    reference = reference or out
    assert out == reference                  # the same tokens whatever the batch
print("| concurrent | output tokens/s |\n|---|---|")
for c, t in zip(concurrency, throughput):
    print(f"| {c} | {t:.0f} |")
plt.figure(figsize=(6, 3.2))
plt.plot(concurrency, throughput, "o-")
plt.xlabel("requests in the batch at once")
plt.ylabel("output tokens / s")
plt.title("continuous batching on the bundled model (this machine)")
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/09_serving.py`](solutions/09_serving.py).
#
# **Exercise 1.** Two prompts share their first 13 tokens, and the block size is 4. How many blocks can
# the second prompt take from the cache? Check with a `BlockManager`.

# %%
# --- your solution ---
shared_blocks = ...   # blocks of 4 the second prompt can take from the cache (an int)
# --- check ---
with check(1, shared_blocks) as exercise:
    manager = BlockManager(num_blocks=16, block_size=4)
    a = Seq(list(range(13)) + [100, 101])
    manager.write_blocks(a, len(a.token_ids))
    a.num_computed = len(a.token_ids)
    manager.register_full_blocks(a)
    b = Seq(list(range(13)) + [200, 201, 202])
    assert manager.take_cached_prefix(b) == shared_blocks * 4
    exercise.note = f"{shared_blocks} blocks ({shared_blocks * 4} tokens)"

# %% [markdown]
# **Exercise 2.** Break the hash chain: make the manager name a block by its own tokens only, then serve a
# prompt whose second block equals another prompt's *first* block. Show that its tokens no longer equal
# `generate` alone (the shared K/V were computed at the wrong positions).

# %%
x, y = tokenizer.encode("abcdefgh"), tokenizer.encode("ijklmnop")
prompts = [y + tokenizer.encode(" qrst"), x + y + tokenizer.encode(" uv")]

# --- your solution ---
broken = ...   # an Engine(model, block_size=8) whose block manager hashes a block by its own tokens only
wrong = ...    # the 12 tokens it generates for prompts[1], after serving x and prompts[0]
# --- check ---
with check(2, broken, wrong) as exercise:
    right = model.generate(prompts[1], max_new_tokens=12, temperature=0.0).tokens[0]
    assert broken.blocks.stats.cached_tokens >= 16 and wrong != right
    exercise.note = f"broken {tokenizer.decode(wrong)!r} vs alone {tokenizer.decode(right)!r}"
