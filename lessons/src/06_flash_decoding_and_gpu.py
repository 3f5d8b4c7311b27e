# Source of lessons/06_flash_decoding_and_gpu.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 6: flash-decoding and the GPU kernels
#
# **What it teaches:** split-K (flash-decoding) attention and its exact merge, how minikv's CUDA kernels
# implement it, and how to run and check those kernels without a GPU.
# **What it assumes:** lesson 1 (online softmax, log-sum-exp), lessons 3 and 5 (the cache, block
# tables); no CUDA knowledge (the lesson explains the terms it uses); a GPU is optional.
#
# During decode each sequence has **one** query per head against a long KV cache. Prefill attention
# parallelises over queries; here there is only one, so a GPU would leave most of its cores idle.
# **Flash-decoding** (split-K) parallelises over the *keys* instead: cut the cache into `n_splits`
# chunks, reduce each chunk independently to a partial output and its log-sum-exp, then **merge** the
# partials exactly.
#
# In this lesson you will
#
# 1. split and merge by hand, and measure that the merge is exact for any number of splits;
# 2. read minikv's CUDA kernels (Numba CUDA) line by line;
# 3. run them **without a GPU** through Numba's CUDA simulator (backend `"cuda-sim"`), checked against
#    the NumPy reference, including the whole bundled model;
# 4. on a machine with an NVIDIA GPU, run `backend="cuda"` and time it (the cell says so and skips
#    otherwise).

# %%
import inspect
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import matplotlib.pyplot as plt

import minikv
from minikv import attention
from minikv.exercises import check

%matplotlib inline

# %% [markdown]
# ## 1. Split, reduce, merge
#
# For one query, chunk `p` of the keys gives
#
# $$out_p = \sum_{j \in p} \frac{e^{s_j}}{\sum_{j' \in p} e^{s_{j'}}} v_j, \qquad lse_p = \log \sum_{j \in p} e^{s_j}.$$
#
# Over all keys the softmax denominator is $\sum_p e^{lse_p}$, so
# $lse = \log \sum_p e^{lse_p}$ and $out = \sum_p e^{lse_p - lse}\, out_p$: each chunk's output, weighted by
# its share of the denominator. Nothing is approximated.

# %%
rng = np.random.default_rng(0)
n_heads, n_kv_heads, head_dim, n_keys = 8, 2, 32, 1000
q = rng.standard_normal((1, n_heads, 1, head_dim))
k_cache = rng.standard_normal((1, n_kv_heads, n_keys, head_dim))
v_cache = rng.standard_normal((1, n_kv_heads, n_keys, head_dim))
lengths = np.array([n_keys])

reference, reference_lse = attention.naive(q, k_cache, v_cache, causal=False, return_lse=True)

def split_k_by_hand(q, k_cache, v_cache, n_splits):
    bounds = np.linspace(0, k_cache.shape[2], n_splits + 1).astype(int)
    outs, lses = [], []
    for j0, j1 in zip(bounds[:-1], bounds[1:]):
        out_p, lse_p = attention.naive(q, k_cache[:, :, j0:j1], v_cache[:, :, j0:j1], causal=False,
                                       return_lse=True)
        outs.append(out_p)
        lses.append(lse_p)
    return outs, lses

print(f"{'n_splits':>9} {'max |merged - naive|':>21} {'max |attention.decode - naive|':>31}")
for n_splits in [1, 2, 4, 8, 64, 1000]:
    merged, merged_lse = attention.merge_partials(*split_k_by_hand(q, k_cache, v_cache, n_splits))
    library = attention.decode(q, k_cache, v_cache, lengths, n_splits=n_splits)
    print(f"{n_splits:>9} {np.abs(merged - reference).max():>21.1e} {np.abs(library - reference).max():>31.1e}")
    assert np.allclose(merged, reference, atol=1e-12) and np.allclose(merged_lse, reference_lse, atol=1e-12)

# %% [markdown]
# Even 1000 splits of one key each merge back to the exact answer (float64 round-off, ~1e-16). Each
# chunk's weight $e^{lse_p - lse}$ is its share of the attention; the shares sum to 1:

# %%
outs, lses = split_k_by_hand(q, k_cache, v_cache, 8)
shares = np.exp(np.stack(lses) - reference_lse)[:, 0, :, 0]            # (splits, heads)
assert np.allclose(shares.sum(axis=0), 1.0)

plt.figure(figsize=(9, 3.5))
bottom = np.zeros(n_heads)
for p in range(shares.shape[0]):
    plt.bar(np.arange(n_heads), shares[p], bottom=bottom, label=f"keys {p * 125}-{p * 125 + 124}")
    bottom += shares[p]
plt.xlabel("query head")
plt.ylabel("share of the softmax denominator")
plt.title("8 splits of 1000 keys: each chunk's weight in the merge")
plt.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the bars, not on them
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The CUDA kernels, line by line
#
# `backends/cuda/kernels.py` holds four Numba CUDA kernels: `flash_attention` (prefill), `split_k_decode`,
# `merge_splits` and `rope`. They are built by a factory for one `KernelConfig` (head_dim and tile sizes
# are compile-time constants on a GPU: shared-memory arrays need fixed sizes, and a constant head_dim lets
# the compiler unroll the dot products). Here is the tile configuration a real GPU would use for the
# bundled model (head_dim 32).
#
# One subtlety first: Numba chooses between the real CUDA target and its **simulator** once per process,
# when `numba.cuda` is first imported. We ask for the `"cuda-sim"` backend *before* importing the kernels,
# which makes this notebook's Python process a simulator process (section 3 runs the kernels in it;
# section 4 starts a fresh process for a real GPU).

# %%
sim = minikv.get_backend("cuda-sim")          # must come before anything imports numba.cuda
from minikv.backends.cuda import kernels

gpu = kernels.gpu_config(head_dim=32)
print(gpu)
print("static shared memory per block (bytes):", gpu.shared_bytes)

# %% [markdown]
# The split-K kernel. One CUDA **block** per (split, sequence x head); within it, thread `t` loads elements
# of K/V rows into shared memory, scores key `t` of the tile, and owns output dimension `t`. Read it
# against the math above: `m`, `l` and `acc` are the online softmax of lesson 1, run over one chunk.
#
# The kernel is about 100 lines, and most of them serve a handful of constants that the factory
# `kernels.kernel_functions(config)` fixes before compiling (on a GPU, shared-memory arrays need sizes
# known at compile time). Their values for the bundled model's `head_dim = 32`, and what each is for:

# %%
functions = kernels.kernel_functions(gpu)
rows_per_pass = gpu.decode_threads // gpu.head_dim
constants = [
    ("HEAD_DIM", gpu.head_dim, "length of a q/k/v row; thread t < HEAD_DIM owns output dimension t"),
    ("DEC_THREADS", gpu.decode_threads, "threads per block: a multiple of HEAD_DIM, at least 64 (two warps)"),
    ("DEC_TILE", gpu.decode_tile, "keys per tile in shared memory; one score per thread, so <= DEC_THREADS"),
    ("ROWS_PER_PASS", rows_per_pass, "DEC_THREADS // HEAD_DIM: K/V rows the block loads in one pass"),
    ("K_STRIDE", gpu.head_dim + 1, "HEAD_DIM + 1: a padded K row, so threads reading column c of "
                                  "different rows hit different shared-memory banks"),
    ("UNROLL", 8, "rows each thread loads into registers before storing them (loads in flight together)"),
    ("DECODE_LOADS", gpu.decode_tile // rows_per_pass, "DEC_TILE // ROWS_PER_PASS: rows per thread per tile"),
]
print("| constant | value | what it is for |\n|---|---|---|")
for name, value, meaning in constants:
    print(f"| `{name}` | {value} | {meaning} |")
tile_bytes = gpu.shared_bytes["split_k_decode"]
print(f"\nshared memory per block: q ({gpu.head_dim}) + DEC_TILE x (K row + V row + 2) floats = {tile_bytes:,} bytes")
assert tile_bytes == (gpu.head_dim + gpu.decode_tile * (2 * gpu.head_dim + 2)) * 4

# %% [markdown]
# Why these sizes: a streaming multiprocessor has a fixed amount of shared memory (up to ~228 KiB on an
# H100). Small decode blocks (two warps, a tile under ~20 KiB) let a dozen of them share one
# multiprocessor, so that while one block waits for memory another computes; with 64-key tiles only
# six fitted and the kernel ran slower (measured on an H100; `gpu_config`'s comments give the numbers).
# Now the kernel itself; every upper-case name in it is one of the constants above:

# %%
print(textwrap.dedent(inspect.getsource(functions["split_k_decode"])))

# %% [markdown]
# Things to notice:
#
# * `block_table[b, j // block_size]`: keys are read **through a block table**, so the same kernel serves
#   the paged cache of lesson 5; a contiguous cache is passed as one block per sequence.
# * `cuda.syncthreads()` separates the phases (tile loaded, scores written, maxima read, probabilities
#   written): every thread of the block must finish one before any starts the next.
# * `acc_t(k_pool[...])` converts a float16 cache element to float32 once, while loading the tile.
# * A single query needs no causal mask: it sits at position `lengths[b] - 1` and every earlier key is
#   visible (a sliding window only moves `start`).
#
# And the merge, one block per (sequence, head), one thread per output dimension:

# %%
print(textwrap.dedent(inspect.getsource(functions["merge_splits"])))

# %% [markdown]
# ## 3. Running the kernels without a GPU: `cuda-sim`
#
# Numba's CUDA simulator runs a kernel launch on NumPy arrays, one Python thread per CUDA thread. It is
# thousands of times slower than a GPU, but it executes *the same kernel code*, so it can be checked
# against the reference on any machine (CI does). The simulator uses small tiles (4 keys) so that even
# tiny inputs cross several tiles and splits.

# %%
print(sim, "| kernel config for head_dim 16:", sim.kernel_config(16, "float32"))

q_small = rng.standard_normal((2, 4, 1, 16)).astype(np.float32)
k_small = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
v_small = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
lens_small = np.array([37, 21])

print(f"{'check':<44} {'max |cuda-sim - reference|':>27} {'sim ms':>8} {'numpy ms':>9}")
def compare(name, sim_call, ref_call, tol=1e-5):
    start = time.perf_counter()
    got = sim_call()
    sim_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    want = ref_call()
    ref_ms = (time.perf_counter() - start) * 1e3
    err = max(float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(got, want))
    print(f"{name:<44} {err:>27.1e} {sim_ms:>8.1f} {ref_ms:>9.2f}")
    assert err < tol, name

for n_splits in [1, 3, 8]:
    compare(f"split-K decode, n_splits={n_splits}",
            lambda: sim.decode_attention(q_small, k_small, v_small, lens_small, n_splits=n_splits),
            lambda: attention.decode(q_small, k_small, v_small, lens_small, return_lse=True))
compare("split-K decode, window=10",
        lambda: sim.decode_attention(q_small, k_small, v_small, lens_small, window=10),
        lambda: attention.decode(q_small, k_small, v_small, lens_small, window=10, return_lse=True))

# the same keys laid out in a paged pool of 8-row blocks, in shuffled order
block_size = 8
n_blocks = 40 // block_size
perm = rng.permutation(2 * n_blocks).astype(np.int32)
block_table = perm.reshape(2, n_blocks)
k_pool = np.empty((2 * n_blocks, 2, block_size, 16), np.float32)
v_pool = np.empty_like(k_pool)
for b in range(2):
    for i in range(n_blocks):
        k_pool[block_table[b, i]] = k_small[b, :, i * block_size:(i + 1) * block_size]
        v_pool[block_table[b, i]] = v_small[b, :, i * block_size:(i + 1) * block_size]
compare("paged decode through a shuffled block table",
        lambda: sim.paged_decode_attention(q_small, k_pool, v_pool, block_table, lens_small),
        lambda: attention.decode(q_small, k_small, v_small, lens_small, return_lse=True))

q_prefill = rng.standard_normal((1, 4, 12, 16)).astype(np.float32)
compare("flash attention prefill, 12 causal queries",
        lambda: sim.attention(q_prefill, k_small[:1, :, :12], v_small[:1, :, :12]),
        lambda: attention.naive(q_prefill, k_small[:1, :, :12], v_small[:1, :, :12], return_lse=True))

# %% [markdown]
# The whole bundled model on the simulated kernels: every attention and every RoPE rotation of every layer
# goes through the CUDA kernel code (the matmuls stay NumPy). Greedy decoding gives the same tokens as the
# NumPy backend. (A few seconds: the simulator is slow.)

# %%
model_numpy = minikv.load()
model_sim = minikv.load(backend="cuda-sim")
start = time.perf_counter()
out_sim = model_sim.generate("Hello", max_new_tokens=3, temperature=0.0)
sim_seconds = time.perf_counter() - start
out_numpy = model_numpy.generate("Hello", max_new_tokens=3, temperature=0.0)
print(f"cuda-sim: {out_sim.text!r} in {sim_seconds:.1f} s;  numpy: {out_numpy.text!r} in "
      f"{out_numpy.stats.prefill_ms + out_numpy.stats.decode_ms:.0f} ms")
assert out_sim.tokens == out_numpy.tokens

# %% [markdown]
# ## 4. On a real GPU: `backend="cuda"`
#
# **This cell needs an NVIDIA GPU with CuPy and numba-cuda installed** (`pip install -e ".[cuda]"`). It runs
# in a fresh Python process (this one is a simulator process, see above). Without a GPU it prints why and
# skips; with one, it checks the GPU model against NumPy and times decode attention on a long cache, where
# splitting the keys is what keeps the GPU busy. (Expect the *bundled* model to be no faster on a GPU: it
# is so small that a decode step is dominated by the cost of launching kernels, not by arithmetic or
# memory. The long caches are where the GPU pays.)

# %%
GPU_SCRIPT = r'''
import time, numpy as np, minikv
if "cuda" not in minikv.available_backends():
    try:
        minikv.get_backend("cuda")
    except minikv.BackendUnavailableError as error:
        print("SKIPPED: no usable GPU here:", error)
    raise SystemExit(0)
gpu = minikv.get_backend("cuda")
print("GPU:", gpu.device_name)
numpy_model, gpu_model = minikv.load(), minikv.load(backend="cuda")
gpu_model.generate("Hello", max_new_tokens=32, temperature=0.0)   # warm-up: the first launches compile the kernels
a = numpy_model.generate("Hello", max_new_tokens=32, temperature=0.0)
b = gpu_model.generate("Hello", max_new_tokens=32, temperature=0.0)
print("same greedy tokens as numpy:", a.tokens == b.tokens)
print(f"bundled model decode: numpy {a.stats.decode_tokens_per_s:,.0f} tokens/s, cuda {b.stats.decode_tokens_per_s:,.0f} tokens/s")
rng = np.random.default_rng(0)
print("| cache length | numpy decode (ms) | cuda decode (ms) | max error |")
print("|---|---|---|---|")
for n in [1024, 16384, 131072]:
    q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
    kc = rng.standard_normal((1, 8, n, 128), dtype=np.float32)
    vc = rng.standard_normal((1, 8, n, 128), dtype=np.float32)
    lengths = np.array([n])
    t = time.perf_counter(); ref = minikv.attention.decode(q, kc, vc, lengths); numpy_ms = (time.perf_counter() - t) * 1e3
    qd, kd, vd = gpu.to_device(q), gpu.to_device(kc), gpu.to_device(vc)
    gpu.decode_attention(qd, kd, vd, lengths); gpu.synchronize()          # compile and warm up
    t = time.perf_counter()
    for _ in range(10):
        out, _ = gpu.decode_attention(qd, kd, vd, lengths)
    gpu.synchronize(); cuda_ms = (time.perf_counter() - t) * 1e3 / 10
    print(f"| {n} | {numpy_ms:.2f} | {cuda_ms:.3f} | {np.abs(gpu.to_host(out) - ref).max():.1e} |")
'''
env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
result = subprocess.run([sys.executable, "-c", GPU_SCRIPT], capture_output=True, text=True, env=env, timeout=240)
print(result.stdout)
assert result.returncode == 0, result.stderr[-2000:]

# %% [markdown]
# ## 5. Why the GPU was slower at batch 1, and what a CUDA graph removes
#
# Measured on an H100 (`benchmarks/results/gpu_nvidia-h100-80gb-hbm3.md`), the 55M-parameter `mid` model
# (8 layers) decoded **30.7 tokens/s on `cuda` against 125 on `numpy`** on the host's CPU at batch 1: a
# step took 1 / 30.7 = 33 ms. What the GPU *must* do per step is read the weights once: 156 MB at
# ~3 TB/s is about **0.05 ms**. So more than 99% of the step was the host, not the GPU:
#
# * every **Numba kernel launch** with CuPy arrays cost ~**160 us** of host time (table 4 of that file:
#   Numba rebuilds a device array from each CuPy argument on every call), and the plain path launches
#   4 Numba kernels per layer (RoPE, the split-K decode and its merge, ...), each decode-attention call
#   ~400-580 us of host time (table 1);
# * the model's ~50 small **CuPy operations** per step each pay their own launch;
# * the step **uploads** its positions and lengths (the host computes them) and **synchronises** with the
#   host when the logits come back.
#
# A kernel launch is a fixed cost of host time; at batch 1 the kernels themselves are microseconds, so
# the step is a queue of tiny kernels whose launches the GPU waits for. Three remedies, each in
# `backends/cuda/step.py`:
#
# 1. **Keep the step's state on the device.** The cache lengths get a device mirror that a one-thread
#    kernel (`advance_lengths`) moves on; the kernels read each new token's position from it, and
#    gather their cos/sin rows themselves. The host keeps its own lengths by the same arithmetic, so
#    nothing is uploaded per step except the token ids.
# 2. **Fuse** what every serious engine fuses: RoPE with the K/V cache write (`rope_write_kv`), the
#    residual add with the next RMSNorm (`add_rms_norm`), silu(gate) * up (`swiglu`).
# 3. **Static buffers, then a CUDA graph.** Every array the step touches is allocated once and every
#    launch writes into one of them, so the whole step is a fixed list of launches with fixed pointers.
#    CUDA can *record* such a list once (stream capture) and *replay* it with a single launch: the
#    per-kernel host cost (Python, Numba's argument handling, the driver call) is paid once at capture,
#    not per step. What stays per step: copy the ids in, one graph launch, copy the logits out.
#
# The simulator cannot time a GPU, but it can count. Below, one decode step of the bundled model on
# each path, counted by the backend (`backend.counters`: transfers through `to_device`/`to_host`, Numba
# launches) and, for the device step, its plan (every launch, CuPy's matmuls included):

# %%
from minikv.backends.cuda.step import DecodeStep

prompt_ids = np.array([out_sim.tokens[0]])               # 3 tokens, from the generation above

def counted(run):
    before = dict(sim.counters)
    run()
    return {key: sim.counters[key] - before[key] for key in before}

cache_plain = model_sim.new_cache("static", max_seq_len=16)
token = model_sim.forward(prompt_ids, cache_plain, last_only=True).argmax(-1)
plain = counted(lambda: model_sim.forward(token[:, None], cache_plain, last_only=True))

cache_step = model_sim.new_cache("static", max_seq_len=16)
model_sim.forward(prompt_ids, cache_step, last_only=True)
step = DecodeStep(model_sim, cache_step)
step.sync_lengths()          # the one upload after a prefill by forward (then never again)
device = counted(lambda: step(token))

n_layers = model_sim.config.n_layers
print(f"bundled model: {n_layers} layers\n")
print("| one decode step | host->device | device->host | Numba launches | all launches |")
print("|---|---|---|---|---|")
print(f"| plain path (model.forward) | {plain['to_device']} | {plain['to_host']} | {plain['launches']} | "
      f"{plain['launches']} + every CuPy op |")
print(f"| device step (step.py) | {device['to_device']} | {device['to_host']} | {device['launches']} | "
      f"{len(step.plan)} |")
print(f"| device step as a CUDA graph | {device['to_device']} | {device['to_host']} | 0 | 1 graph launch |")
print("\nlaunches of the device step by kind:", step.launch_counts())
assert device["to_device"] == 1 and device["to_host"] == 1
assert len(step.plan) == 10 * n_layers + 4

# %% [markdown]
# (The simulator counts every index array the plain path hands a kernel as an upload; backend `"cuda"`
# memoises them within a step, so on a GPU the plain path uploads about 3 arrays per step: the ids, the
# positions and the new lengths.)
#
# The device step launches *more* Numba kernels than the plain path (it replaced CuPy's elementwise ops
# by its own fused kernels), so without a graph its gain on a GPU is only the uploads and the cheaper
# arguments (each buffer is converted to a Numba device array once: ~45 us per launch instead of ~160 us,
# table 4). The graph is what removes the launch cost: on replay the GPU runs the 10 L + 4 kernels back to
# back, and a step costs its GPU time plus one launch and two small copies.
#
# One catch: CuPy refuses cuBLAS calls while it captures a graph, so the plan a graph records must
# contain nothing but our own kernels. `DecodeStep(..., library_free=True)` swaps the matmuls for two
# small kernels of its own (`gemv_partial` splits the long axis across blocks, `gemv_reduce` adds the
# pieces and the bias), and the embedding lookup and greedy argmax too: 15 L + 4 launches, all Numba.
#
# **Not measured yet.** No GPU was available when this was written. Capture (`step.capture()`, CuPy's
# `Stream.begin_capture` / `end_capture`) is coded for backend `"cuda"` and falls back to launching
# kernel by kernel when the GPU or CuPy refuses it (`step.graph_error` says why).
# `benchmarks/gpu_check.sh` measures it in one run on a GPU (tokens/s with the plain path, the device step,
# and the graph), against the targets of issue 19: `cuda` >= 5x `numpy` at batch 1 on `mid`.

# %% [markdown]
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/06_flash_decoding_and_gpu.py`](solutions/06_flash_decoding_and_gpu.py).
#
# **Exercise 1.** A chunk that saw no keys has `out_p = 0` and `lse_p = -inf`. Show that adding such a part
# to a merge changes nothing (it has weight $e^{-\infty} = 0$).

# %%
outs, lses = split_k_by_hand(q, k_cache, v_cache, 4)

# --- your solution ---
with_empty = ...   # attention.merge_partials of the four parts plus an empty one (out 0, lse -inf)
without = ...      # attention.merge_partials of the four parts
# --- check ---
with check(1, with_empty, without):
    assert np.allclose(with_empty[0], without[0], atol=1e-15) and np.allclose(with_empty[1], without[1], atol=1e-15)

# %% [markdown]
# **Exercise 2.** Write the merge of **two** partials by hand with `np.logaddexp`, and check it against
# `attention.merge_partials`. Then check that merging is associative: merging chunks (0, 1) first and
# then the result with (2, 3) equals merging all four at once.

# %%
# --- your solution ---
def merge_two(out_a, lse_a, out_b, lse_b):
    """Merge two partials (out: (..., head_dim), lse: (...)) into one (out, lse)."""
    raise NotImplementedError("exercise 2: lse = logaddexp(lse_a, lse_b), then weight each out")
# --- check ---
with check(2, merge_two):
    left = merge_two(outs[0], lses[0], outs[1], lses[1])
    right = merge_two(outs[2], lses[2], outs[3], lses[3])
    tree = merge_two(*left, *right)
    assert np.allclose(left[0], attention.merge_partials(outs[:2], lses[:2])[0], atol=1e-14)
    assert np.allclose(tree[0], reference, atol=1e-12) and np.allclose(tree[1], reference_lse, atol=1e-12)

# %% [markdown]
# **Exercise 3.** In `split_k_decode`, a sequence of length `L` with a sliding window `W` reads keys
# `start = max(0, L - W)` to `L - 1`, cut into chunks of `ceil((L - start) / n_splits)` keys. For `L = 37`,
# `W = 10` and `n_splits = 4`, list the `(first, last + 1)` key range of each split. Then run the simulated
# kernel with exactly those settings and check it against the reference.

# %%
L, W, n_splits = 37, 10, 4

# --- your solution ---
ranges = ...   # [(first, last + 1)] of each of the n_splits chunks
# --- check ---
with check(3, ranges) as exercise:
    assert ranges == [(27, 30), (30, 33), (33, 36), (36, 37)]
    one_seq = (q_small[:1], k_small[:1], v_small[:1], np.array([L]))
    got, _ = sim.decode_attention(*one_seq, window=W, n_splits=n_splits)
    assert np.allclose(got, attention.decode(*one_seq, window=W), atol=1e-5)
    exercise.note = str(ranges)
