"""The CUDA kernels of minikv, written with Numba CUDA (``numba-cuda``).

Importing this module imports ``numba.cuda``; whether that is the real CUDA target or Numba's
CUDA simulator was decided before (``backends/cuda/__init__.py``, ``load_kernels``): the very same
Python functions below run on a GPU (``cuda.jit`` compiles them to PTX) or, under the simulator,
as Python threads on NumPy arrays, one thread per CUDA thread, so they can be read, stepped
through and tested on any machine.

Four kernels serve the protocol (``minikv.backend``):

``flash_attention``   prefill attention, flash attention's forward pass in FA2's loop order
``split_k_decode``    one query per sequence against its cache (flash-decoding), through a block table
``merge_splits``      combines the partial results of split_k_decode exactly
``rope``              rotary position embeddings, both pair conventions

and four more serve the device-resident decode step (``backends/cuda/step.py``), fusing what a
step would otherwise launch as several kernels and reading every position from the device:

``rope_write_kv``     RoPE on q and k of one new token per sequence + the K/V cache write, at the
                      position ``ends[b] - 1`` read from a device array (no host upload per step)
``add_rms_norm``      the residual add ``x += delta`` and the next RMSNorm of x, in one pass
``swiglu``            silu(gate) * up of the fused (gate | up) projection
``advance_lengths``   ``ends[b] += 1``: the device mirror of the cache lengths moves on

and four that replace the CuPy calls of a step (cuBLAS matmuls, ``take``, ``argmax``) where a step
must contain nothing but our own kernels (CuPy refuses library calls while capturing a CUDA graph):

``gemv_partial``      x (rows, K) @ W (K, N) for a few rows, the K axis split across blocks
``gemv_reduce``       sums the K splits (+ bias) into the output
``embed_rows``        out[r] = table[ids[r]]: the embedding gather
``argmax_rows``       ids[r] = argmax(logits[r]) (the first maximum, as NumPy): greedy decoding

Each is built by a factory for one ``KernelConfig`` (head_dim, tile sizes, compute dtype): CUDA
needs the sizes of shared and local arrays at compile time, and a constant head_dim lets the
compiler unroll the dot products and keep a query row and its accumulator in registers.

Precision. K and V may be float16 (a half-size cache) or float32; every score, exponential and
accumulator is float32 (``compute="float32"``), the output is written in q's dtype. A float64
model gets float64 kernels (``compute="float64"``). A Python float literal would be a float64 in
Numba and silently turn a float32 kernel into a float64 one (16-64x slower on most GPUs), so every
constant below is a scalar of the compute dtype; tests/test_cuda_ptx.py checks the PTX of the
float32 kernels contains no ``.f64`` instruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda <= 0.30 registers a CUDA overload for np.row_stack when it compiles its first
    # kernel; NumPy 2.5 removed that old alias of np.vstack, and the compile then fails with
    # AttributeError. Restoring the alias (what it always was) lets it load.
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402
from numba import float32, float64, int64  # noqa: E402

KERNEL_NAMES = ("flash_attention", "split_k_decode", "merge_splits", "rope", "rope_write_kv", "add_rms_norm", "swiglu",
                "advance_lengths", "gemv_partial", "gemv_reduce", "embed_rows", "argmax_rows")


@dataclass(frozen=True)
class KernelConfig:
    """Everything a kernel's compiled code depends on besides the array types.

    head_dim:       the size of a query/key row (unrolled dot products, register accumulators).
    block_q:        prefill: query rows per thread block = threads per block (one row each).
    block_k:        prefill: keys per tile held in shared memory.
    decode_threads: decode: threads per block; a multiple of head_dim (thread t owns output dim t).
    decode_tile:    decode: keys per tile in shared memory (<= decode_threads: one score each).
    rope_threads:   rope, rope_write_kv, swiglu, advance_lengths: threads per block (one element
                    or rotation pair each).
    norm_threads:   add_rms_norm, argmax_rows: threads per block, one block per row (a power of
                    two: the sum of squares / the maximum is a tree reduction in shared memory).
    gemv_threads:   gemv_partial: threads per block = output columns per block.
    gemv_rows:      gemv_partial: rows accumulated together in registers (each W element read
                    once per group of gemv_rows rows: a decode batch of <= 16 reads W once).
    compute:        "float32" or "float64": the dtype of every score and accumulator.
    """

    head_dim: int
    block_q: int = 64
    block_k: int = 64
    decode_threads: int = 64
    decode_tile: int = 64
    rope_threads: int = 128
    norm_threads: int = 128
    gemv_threads: int = 128
    gemv_rows: int = 16
    compute: str = "float32"

    def __post_init__(self):
        if self.head_dim < 1 or self.block_q < 1 or self.block_k < 1 or self.rope_threads < 1:
            raise ValueError(f"{self}: every size must be >= 1")
        if self.decode_threads % self.head_dim:
            raise ValueError(f"{self}: decode_threads must be a multiple of head_dim")
        if not 1 <= self.decode_tile <= self.decode_threads:
            raise ValueError(f"{self}: need 1 <= decode_tile <= decode_threads")
        if self.decode_tile % (self.decode_threads // self.head_dim):
            raise ValueError(f"{self}: decode_tile must be a multiple of decode_threads // head_dim (rows per pass)")
        if self.norm_threads < 1 or self.norm_threads & (self.norm_threads - 1):
            raise ValueError(f"{self}: norm_threads must be a power of two")
        if self.compute not in ("float32", "float64"):
            raise ValueError(f"{self}: compute must be 'float32' or 'float64'")

    @property
    def shared_bytes(self) -> dict[str, int]:
        """Static shared memory of each kernel (a block may use at most 48 KiB of it)."""
        item = np.dtype(self.compute).itemsize
        return {"flash_attention": 2 * self.block_k * self.head_dim * item,
                "split_k_decode": (self.head_dim + self.decode_tile * (2 * self.head_dim + 2)) * item}


def gpu_config(head_dim: int, compute: str = "float32") -> KernelConfig:
    """Tile sizes for a real GPU: 64 query rows per block, and key tiles as large as ~32-40 KiB of
    shared memory allows (so two or more blocks fit on a streaming multiprocessor)."""
    item = np.dtype(compute).itemsize
    block_k = 64
    while block_k > 8 and 2 * block_k * head_dim * item > 32 * 1024:
        block_k //= 2
    decode_threads = head_dim * -(-64 // head_dim)   # >= 64 threads, a multiple of head_dim
    # Decode blocks are small (2 warps); keeping their shared memory near 16 KiB lets ~12 of them
    # share a streaming multiprocessor, so that other warps run while one waits for memory (with
    # 64-key tiles, 33 KiB, only 6 fitted: 14% occupancy measured on an H100).
    decode_tile = 32
    while decode_tile > 8 and decode_tile * (2 * head_dim + 2) * item > 20 * 1024:
        decode_tile //= 2
    rows_per_pass = decode_threads // head_dim
    decode_tile = max(rows_per_pass, min(decode_tile, decode_threads) // rows_per_pass * rows_per_pass)
    return KernelConfig(head_dim=head_dim, block_q=64, block_k=block_k, decode_threads=decode_threads,
                        decode_tile=decode_tile, rope_threads=128, compute=compute)


def kernel_functions(config: KernelConfig) -> dict:
    """The kernels as plain Python functions specialised to ``config`` (not yet compiled).

    ``build_kernels`` compiles them with ``cuda.jit``; tests/test_cuda_ptx.py hands them to
    ``cuda.compile_ptx``. Their constants (sizes, dtype) are closure variables, which Numba
    freezes into the compiled code like globals."""
    acc_t = float32 if config.compute == "float32" else float64   # the compute dtype, as a Numba type
    np_acc = np.dtype(config.compute).type
    NEG_INF, ZERO, ONE = np_acc(-np.inf), np_acc(0.0), np_acc(1.0)
    HEAD_DIM = config.head_dim
    BLOCK_Q, BLOCK_K = config.block_q, config.block_k
    DEC_THREADS, DEC_TILE = config.decode_threads, config.decode_tile
    ROWS_PER_PASS = DEC_THREADS // HEAD_DIM   # K/V rows one pass of the block loads into shared memory
    K_STRIDE = HEAD_DIM + 1                   # padded row: thread c reading row c hits distinct banks
    # Filling split_k_decode's tile of shared memory. A GPU thread issues its instructions in order:
    # a loop that loads an element and stores it to shared memory in the same iteration waits one
    # full memory latency (~1 us) per element. So a full tile is loaded in groups of UNROLL rows:
    # first UNROLL loads into registers (independent: all in flight together), then UNROLL stores.
    # The inner loops have a constant trip count, which LLVM unrolls (Numba has no #pragma unroll),
    # and the register arrays then live in registers. (On an H100 this made the float32 decode
    # ~25% faster; the same change made flash_attention slower, which has fewer registers to spare.)
    UNROLL = 8
    DECODE_LOADS = DEC_TILE // ROWS_PER_PASS              # rows per thread per tile
    DECODE_GROUPS = -(-DECODE_LOADS // UNROLL)
    HALF = HEAD_DIM // 2
    NORM_THREADS = config.norm_threads
    GEMV_THREADS, GEMV_ROWS = config.gemv_threads, config.gemv_rows

    def flash_attention(q, k, v, q_offset, lengths, causal, window, scale, out, lse):
        """Flash attention forward, FA2 loop order.

        Grid (ceil(seq_q / BLOCK_Q), batch * n_heads); BLOCK_Q threads; thread t owns query row
        i = tile * BLOCK_Q + t of head h of sequence b and keeps, in registers,

            m = running max of its scores,  l = sum exp(s - m),  acc = sum exp(s - m) v.

        The block walks the key tiles: all its threads copy BLOCK_K keys and values into shared
        memory (coalesced: consecutive threads read consecutive elements), then each thread scores
        its row against the tile and updates (m, l, acc) with the online softmax:

            m_new = max(m, rowmax(s)),  l = l exp(m - m_new) + sum_j exp(s_j - m_new),
            acc = acc exp(m - m_new) + sum_j exp(s_j - m_new) v_j.

        Block skipping: the tiles visited are only those some row of the block can see: up to
        the causal diagonal of the block's last row (bottom-right aligned through q_offset[b]),
        up to lengths[b], and from the window's start of its first row. Query i of sequence b
        sits at position q_offset[b] + i; it sees key j iff j < lengths[b], (causal)
        j <= q_offset[b] + i and (window > 0) q_offset[b] + i - j < window.
        """
        tile = cuda.blockIdx.x
        n_heads = q.shape[1]
        b = cuda.blockIdx.y // n_heads
        h = cuda.blockIdx.y % n_heads
        kv = h // (n_heads // k.shape[1])      # GQA: query head h reads kv head h // group
        t = cuda.threadIdx.x
        seq_q = q.shape[2]
        i0 = tile * BLOCK_Q
        i = i0 + t
        row_valid = i < seq_q

        k_tile = cuda.shared.array((BLOCK_K, HEAD_DIM), acc_t)
        v_tile = cuda.shared.array((BLOCK_K, HEAD_DIM), acc_t)
        q_row = cuda.local.array(HEAD_DIM, acc_t)
        acc = cuda.local.array(HEAD_DIM, acc_t)
        scores = cuda.local.array(BLOCK_K, acc_t)

        for d in range(HEAD_DIM):
            acc[d] = ZERO
            q_row[d] = ZERO
        if row_valid:
            for d in range(HEAD_DIM):
                q_row[d] = acc_t(q[b, h, i, d]) * scale   # fold the 1/sqrt(d) into q once
        m = NEG_INF
        l = ZERO
        pos = q_offset[b] + i

        # The keys any row of this block can see; the same for every thread of the block, so
        # every thread runs the same tiles and reaches the same syncthreads().
        first_pos = q_offset[b] + i0
        last_pos = first_pos + min(BLOCK_Q, seq_q - i0) - 1
        key_end = lengths[b]
        if causal:
            key_end = min(key_end, last_pos + 1)       # tiles above the diagonal: never loaded
        key_begin = 0
        if window > 0:
            key_begin = max(0, first_pos - window + 1)  # tiles before every row's window: skipped
        key_begin = (key_begin // BLOCK_K) * BLOCK_K

        for j0 in range(key_begin, key_end, BLOCK_K):
            n_k = min(BLOCK_K, key_end - j0)
            cuda.syncthreads()   # the previous tile has been read by every thread
            # (Measured on an H100, staging these loads through registers as split_k_decode does made
            # this kernel slower: it has fewer registers to spare. One element per iteration.)
            for e in range(t, n_k * HEAD_DIM, BLOCK_Q):
                c = e // HEAD_DIM
                d = e % HEAD_DIM
                k_tile[c, d] = acc_t(k[b, kv, j0 + c, d])   # float16 -> float32 here, once
                v_tile[c, d] = acc_t(v[b, kv, j0 + c, d])
            cuda.syncthreads()   # the tile is complete
            if row_valid:
                row_max = NEG_INF
                for c in range(n_k):
                    j = j0 + c
                    if (causal and j > pos) or (window > 0 and pos - j >= window):
                        scores[c] = NEG_INF
                    else:
                        s = ZERO
                        for d in range(HEAD_DIM):
                            s += q_row[d] * k_tile[c, d]
                        scores[c] = s
                        row_max = max(row_max, s)
                m_new = max(m, row_max)
                if m_new != NEG_INF:   # a row that has seen no key yet stays (-inf, 0, 0)
                    rescale = math.exp(m - m_new)   # exp(m - m_new) <= 1; 0 while m = -inf
                    l *= rescale
                    for d in range(HEAD_DIM):
                        acc[d] *= rescale
                    for c in range(n_k):
                        p = math.exp(scores[c] - m_new)   # masked keys: exp(-inf) = 0
                        l += p
                        for d in range(HEAD_DIM):
                            acc[d] += p * v_tile[c, d]
                    m = m_new

        if row_valid:
            if l > ZERO:
                inv_l = ONE / l
                for d in range(HEAD_DIM):
                    out[b, h, i, d] = acc[d] * inv_l
                lse[b, h, i] = m + math.log(l)
            else:   # a row that sees no key: zeros and lse = -inf, never NaN
                for d in range(HEAD_DIM):
                    out[b, h, i, d] = ZERO
                lse[b, h, i] = NEG_INF

    def split_k_decode(q, k_pool, v_pool, block_table, block_size, lengths, window, scale, part_out, part_lse):
        """Flash-decoding, first pass: block (split, b * n_heads + h) reduces one chunk of keys.

        The query of sequence b sits at position lengths[b] - 1 and sees keys [start, lengths[b])
        with start = max(0, lengths[b] - window): a single query needs no mask. Those keys are cut
        into gridDim.x chunks; this block reduces chunk ``split`` to (part_out, part_lse), which
        merge_splits combines. Keys are read through the block table: key j lives in block
        block_table[b, j // block_size] at row j % block_size (a contiguous cache is one block per
        sequence). Per tile of DEC_TILE keys:

            1. all threads copy the tile's K and V rows to shared memory (thread -> one element
               of a row: coalesced reads of the cache);
            2. thread c computes score s_c = q . k_c (q pre-scaled, in shared memory);
            3. every thread reads the tile's max: m_new = max(m, max_c s_c);
            4. thread c turns its score into p_c = exp(s_c - m_new);
            5. thread t (< head_dim) updates output dimension t:
               acc_t = acc_t exp(m - m_new) + sum_c p_c v_c[t];  l likewise with sum_c p_c.
        """
        split = cuda.blockIdx.x
        n_splits = cuda.gridDim.x
        n_heads = q.shape[1]
        b = cuda.blockIdx.y // n_heads
        h = cuda.blockIdx.y % n_heads
        kv = h // (n_heads // k_pool.shape[1])
        t = cuda.threadIdx.x

        q_sh = cuda.shared.array(HEAD_DIM, acc_t)
        k_tile = cuda.shared.array((DEC_TILE, K_STRIDE), acc_t)
        v_tile = cuda.shared.array((DEC_TILE, HEAD_DIM), acc_t)
        p_tile = cuda.shared.array(DEC_TILE, acc_t)
        k_regs = cuda.local.array(UNROLL, acc_t)
        v_regs = cuda.local.array(UNROLL, acc_t)

        if t < HEAD_DIM:
            q_sh[t] = acc_t(q[b, h, 0, t]) * scale
        length = lengths[b]
        start = 0
        if window > 0:
            start = max(0, length - window)   # keys before the window are never read
        chunk = (length - start + n_splits - 1) // n_splits
        j_begin = start + split * chunk
        j_end = min(j_begin + chunk, length)

        m = NEG_INF
        l = ZERO
        acc = ZERO          # this thread's output dimension t
        load_row = t // HEAD_DIM
        load_dim = t % HEAD_DIM
        for j0 in range(j_begin, j_end, DEC_TILE):
            n_k = min(DEC_TILE, j_end - j0)
            cuda.syncthreads()   # q_sh is written / the previous tile has been read
            if n_k == DEC_TILE:   # a full tile: UNROLL rows in flight per thread (see above)
                for group in range(DECODE_GROUPS):
                    for u in range(UNROLL):
                        if group * UNROLL + u < DECODE_LOADS:
                            j = j0 + load_row + (group * UNROLL + u) * ROWS_PER_PASS
                            block = block_table[b, j // block_size]   # the page holding key j
                            row = j % block_size
                            k_regs[u] = acc_t(k_pool[block, kv, row, load_dim])
                            v_regs[u] = acc_t(v_pool[block, kv, row, load_dim])
                    for u in range(UNROLL):
                        if group * UNROLL + u < DECODE_LOADS:
                            c = load_row + (group * UNROLL + u) * ROWS_PER_PASS
                            k_tile[c, load_dim] = k_regs[u]
                            v_tile[c, load_dim] = v_regs[u]
            else:                 # the last, partial tile
                for c in range(load_row, n_k, ROWS_PER_PASS):
                    j = j0 + c
                    block = block_table[b, j // block_size]
                    row = j % block_size
                    k_tile[c, load_dim] = acc_t(k_pool[block, kv, row, load_dim])
                    v_tile[c, load_dim] = acc_t(v_pool[block, kv, row, load_dim])
            cuda.syncthreads()
            if t < n_k:
                s = ZERO
                for d in range(HEAD_DIM):
                    s += q_sh[d] * k_tile[t, d]
                p_tile[t] = s
            cuda.syncthreads()
            tile_max = NEG_INF
            for c in range(n_k):
                tile_max = max(tile_max, p_tile[c])
            m_new = max(m, tile_max)   # finite: every key of the chunk is visible
            cuda.syncthreads()   # every thread has read the scores before they become probabilities
            if t < n_k:
                p_tile[t] = math.exp(p_tile[t] - m_new)
            cuda.syncthreads()
            rescale = math.exp(m - m_new)
            l *= rescale
            acc *= rescale
            for c in range(n_k):
                p = p_tile[c]
                l += p
                if t < HEAD_DIM:
                    acc += p * v_tile[c, t]
            m = m_new

        if t < HEAD_DIM:
            if l > ZERO:
                part_out[b, h, split, t] = acc / l
            else:   # an empty chunk (more splits than keys): weight 0 in the merge
                part_out[b, h, split, t] = ZERO
        if t == 0:
            if l > ZERO:
                part_lse[b, h, split] = m + math.log(l)
            else:
                part_lse[b, h, split] = NEG_INF

    def merge_splits(part_out, part_lse, out, lse):
        """Flash-decoding, second pass: block b * n_heads + h, thread d merges output dimension d.

            m = max_p lse_p,  w_p = exp(lse_p - m),  out = sum_p w_p out_p / sum_p w_p,
            lse = m + log sum_p w_p.
        Exact: the weights are each chunk's share of the softmax's denominator."""
        n_heads = out.shape[1]
        b = cuda.blockIdx.x // n_heads
        h = cuda.blockIdx.x % n_heads
        d = cuda.threadIdx.x
        n_splits = part_lse.shape[2]
        m = NEG_INF
        for p in range(n_splits):
            m = max(m, part_lse[b, h, p])
        if m == NEG_INF:   # no chunk saw a key
            out[b, h, 0, d] = ZERO
            if d == 0:
                lse[b, h, 0] = NEG_INF
            return
        total = ZERO
        value = ZERO
        for p in range(n_splits):
            w = math.exp(part_lse[b, h, p] - m)
            total += w
            value += w * part_out[b, h, p, d]
        out[b, h, 0, d] = value / total
        if d == 0:
            lse[b, h, 0] = m + math.log(total)

    def rope(x, cos, sin, interleaved, out):
        """One thread per rotation pair: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).

        x (batch, heads, seq, d); cos, sin 4-D, broadcastable to (batch, heads, seq, d/2): an axis
        of size 1 is read at index 0 (``b % cos.shape[0]``). Pair p is (p, p + d/2) for the "half"
        convention and (2p, 2p + 1) for "interleaved"."""
        index = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        batch, heads, seq, head_dim = x.shape
        half = head_dim // 2
        if index >= batch * heads * seq * half:
            return
        p = index % half
        s = (index // half) % seq
        h = (index // (half * seq)) % heads
        b = index // (half * seq * heads)
        if interleaved:
            first = 2 * p
            second = 2 * p + 1
        else:
            first = p
            second = p + half
        x1 = acc_t(x[b, h, s, first])
        x2 = acc_t(x[b, h, s, second])
        c = acc_t(cos[b % cos.shape[0], h % cos.shape[1], s % cos.shape[2], p])
        sn = acc_t(sin[b % sin.shape[0], h % sin.shape[1], s % sin.shape[2], p])
        out[b, h, s, first] = x1 * c - x2 * sn
        out[b, h, s, second] = x1 * sn + x2 * c

    # ------------------------------------------------------------------ the device decode step

    def rope_write_kv(qkv, cos, sin, ends, block_table, block_size, n_q, n_kv, interleaved, q_out, k_pool, v_pool):
        """RoPE + the K/V cache write of one new token per sequence, in one launch.

        qkv (batch, (n_q + 2 n_kv) HEAD_DIM): the fused projection's row of each sequence, heads side
        by side (n_q query heads, n_kv key heads, n_kv value heads). The new token of sequence b sits
        at position pos = ends[b] - 1, read here from a device array: the host never uploads it.
        One thread per (b, head, rotation pair):

            query head:  q_out[b, h, 0, pair] = rotate(x_pair, cos[pos], sin[pos])
            key head:    k_pool[block, kv, row, pair] = rotate(x_pair, cos[pos], sin[pos])
            value head:  v_pool[block, kv, row, pair] = x_pair                  (no rotation)

        with block = block_table[b, pos // block_size], row = pos % block_size (a contiguous cache
        is one block of ``capacity`` rows per sequence), rotate(x1, x2) = (x1 c - x2 s, x1 s + x2 c)
        and the pair (p, p + HEAD_DIM/2) ("half") or (2p, 2p + 1) ("interleaved"). Unfused, the
        same work is a gather of cos/sin rows, a rope launch and two cache writes per layer."""
        index = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        heads = n_q + 2 * n_kv
        if index >= qkv.shape[0] * heads * HALF:
            return
        p = index % HALF
        hh = (index // HALF) % heads
        b = index // (HALF * heads)
        if interleaved:
            first = 2 * p
            second = 2 * p + 1
        else:
            first = p
            second = p + HALF
        x1 = acc_t(qkv[b, hh * HEAD_DIM + first])
        x2 = acc_t(qkv[b, hh * HEAD_DIM + second])
        pos = ends[b] - 1
        if hh < n_q + n_kv:
            c = acc_t(cos[pos, p])
            sn = acc_t(sin[pos, p])
            y1 = x1 * c - x2 * sn
            y2 = x1 * sn + x2 * c
        else:
            y1 = x1
            y2 = x2
        if hh < n_q:
            q_out[b, hh, 0, first] = y1
            q_out[b, hh, 0, second] = y2
            return
        block = block_table[b, pos // block_size]
        row = pos % block_size
        if hh < n_q + n_kv:
            k_pool[block, hh - n_q, row, first] = y1
            k_pool[block, hh - n_q, row, second] = y2
        else:
            v_pool[block, hh - n_q - n_kv, row, first] = y1
            v_pool[block, hh - n_q - n_kv, row, second] = y2

    def add_rms_norm(x, delta, weight, eps, inv_d, add, h):
        """The residual add and the next RMSNorm in one pass over the row (block r = row r):

            if add: x[r] += delta[r]          (the residual stream, in place)
            h[r] = x[r] / sqrt(sum(x[r]^2) inv_d + eps) * weight

        inv_d = 1/d rounded to the compute dtype (as minikv.layers.rms_norm computes the mean).
        Unfused, this is an add, then a norm that reads x again: two launches and two reads of x."""
        r = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = x.shape[1]
        partial = cuda.shared.array(NORM_THREADS, acc_t)
        s = ZERO
        for i in range(t, d, NORM_THREADS):
            value = acc_t(x[r, i])
            if add:
                value += acc_t(delta[r, i])
                x[r, i] = value
            s += value * value
        partial[t] = s
        cuda.syncthreads()
        stride = NORM_THREADS // 2
        while stride > 0:          # tree reduction: log2(NORM_THREADS) halvings
            if t < stride:
                partial[t] += partial[t + stride]
            cuda.syncthreads()
            stride //= 2
        inv = ONE / math.sqrt(partial[0] * inv_d + eps)
        for i in range(t, d, NORM_THREADS):
            h[r, i] = acc_t(x[r, i]) * inv * acc_t(weight[i])

    def swiglu(hidden, act):
        """act[r, i] = silu(gate) * up = gate / (1 + exp(-gate)) * up, with gate = hidden[r, i] and
        up = hidden[r, I + i] (the fused projection's two halves); one thread per element."""
        index = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        inter = act.shape[1]
        if index >= act.shape[0] * inter:
            return
        r = index // inter
        i = index % inter
        gate = acc_t(hidden[r, i])
        act[r, i] = gate / (ONE + math.exp(-gate)) * acc_t(hidden[r, inter + i])

    def advance_lengths(ends):
        """ends[b] += 1 for every sequence: the step's last launch, so the next step's kernels read
        the next position from the device (a cache's advance(n_new) with n_new = 1, on the device)."""
        b = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if b < ends.shape[0]:
            ends[b] += 1

    # ------------------------------------------------------------------ library-free step (graph capture)

    def gemv_partial(x, w, part, k_chunk):
        """part[split, r, c] = sum over k in split's chunk of x[r, k] w[k, c].

        Grid (ceil(N / GEMV_THREADS), n_splits), thread t owns column c = block.x * GEMV_THREADS + t.
        A decode step has a few rows and W is (K, N) row-major: consecutive threads read consecutive
        columns of one W row (coalesced), and every W element is read once per GEMV_ROWS rows (the
        accumulators are registers). Splitting K puts enough blocks in flight for a small N; the
        partial sums are added by gemv_reduce in a fixed order (deterministic, no atomics)."""
        c = cuda.blockIdx.x * GEMV_THREADS + cuda.threadIdx.x
        split = cuda.blockIdx.y
        rows = x.shape[0]
        n = w.shape[1]
        if c >= n:
            return
        k_begin = split * k_chunk
        k_end = min(k_begin + k_chunk, w.shape[0])
        acc = cuda.local.array(GEMV_ROWS, acc_t)
        for r0 in range(0, rows, GEMV_ROWS):
            n_rows = min(GEMV_ROWS, rows - r0)
            for r in range(GEMV_ROWS):
                acc[r] = ZERO
            for k in range(k_begin, k_end):
                weight = acc_t(w[k, c])
                for r in range(GEMV_ROWS):
                    if r < n_rows:
                        acc[r] += acc_t(x[r0 + r, k]) * weight
            for r in range(GEMV_ROWS):
                if r < n_rows:
                    part[split, r0 + r, c] = acc[r]

    def gemv_reduce(part, bias, has_bias, out):
        """out[r, c] = sum_split part[split, r, c] (+ bias[c]); one thread per output element."""
        index = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        n = out.shape[1]
        if index >= out.shape[0] * n:
            return
        r = index // n
        c = index % n
        total = ZERO
        for split in range(part.shape[0]):
            total += part[split, r, c]
        if has_bias:
            total += acc_t(bias[c])
        out[r, c] = total

    def embed_rows(table, ids, out):
        """out[r, i] = table[ids[r], i]; one thread per output element."""
        index = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        d = out.shape[1]
        if index >= out.shape[0] * d:
            return
        r = index // d
        out[r, index % d] = table[ids[r], index % d]

    def argmax_rows(logits, ids):
        """ids[r] = the first index of the maximum of logits[r] (NumPy's argmax); block r = row r.

        Each thread scans a strided part of the row, then a tree reduction over (value, index) pairs
        keeps the larger value, and on a tie the smaller index."""
        r = cuda.blockIdx.x
        t = cuda.threadIdx.x
        best_value = cuda.shared.array(NORM_THREADS, acc_t)
        best_index = cuda.shared.array(NORM_THREADS, int64)
        value = NEG_INF
        where = logits.shape[1]
        for i in range(t, logits.shape[1], NORM_THREADS):
            current = acc_t(logits[r, i])
            if current > value or where == logits.shape[1]:
                value = current
                where = i
        best_value[t] = value
        best_index[t] = where
        cuda.syncthreads()
        stride = NORM_THREADS // 2
        while stride > 0:
            if t < stride:
                other_value = best_value[t + stride]
                other_index = best_index[t + stride]
                if other_value > best_value[t] or (other_value == best_value[t] and other_index < best_index[t]):
                    best_value[t] = other_value
                    best_index[t] = other_index
            cuda.syncthreads()
            stride //= 2
        if t == 0:
            ids[r] = best_index[0]

    return {"flash_attention": flash_attention, "split_k_decode": split_k_decode,
            "merge_splits": merge_splits, "rope": rope, "rope_write_kv": rope_write_kv,
            "add_rms_norm": add_rms_norm, "swiglu": swiglu, "advance_lengths": advance_lengths,
            "gemv_partial": gemv_partial, "gemv_reduce": gemv_reduce, "embed_rows": embed_rows,
            "argmax_rows": argmax_rows}


@dataclass(frozen=True)
class Kernels:
    """The compiled (or, under the simulator, wrapped) kernels of one KernelConfig."""

    config: KernelConfig
    flash_attention: object
    split_k_decode: object
    merge_splits: object
    rope: object
    rope_write_kv: object
    add_rms_norm: object
    swiglu: object
    advance_lengths: object
    gemv_partial: object
    gemv_reduce: object
    embed_rows: object
    argmax_rows: object


@lru_cache(maxsize=None)
def build_kernels(config: KernelConfig) -> Kernels:
    """``cuda.jit`` each kernel of ``config``. Compilation itself happens at the first launch, once
    per combination of argument types (e.g. a float16 and a float32 cache)."""
    functions = kernel_functions(config)
    return Kernels(config=config, **{name: cuda.jit(functions[name]) for name in KERNEL_NAMES})


def example_signatures(config: KernelConfig, q_dtype: str = "float32", cache_dtype: str = "float32") -> dict:
    """Numba signatures of each kernel as the backends launch them (C-contiguous q and outputs,
    caches possibly strided views), for ahead-of-time compilation (``cuda.compile_ptx``)."""
    from numba import types

    def array(dtype, ndim, layout="C"):
        return types.Array(getattr(types, dtype), ndim, layout)

    acc = config.compute
    i64 = types.int64
    i32 = types.int32
    scalar = getattr(types, acc)
    return {
        "flash_attention": (array(q_dtype, 4), array(cache_dtype, 4, "A"), array(cache_dtype, 4, "A"),
                            array("int64", 1), array("int64", 1), types.boolean, i64, scalar,
                            array(q_dtype, 4), array(q_dtype, 3)),
        "split_k_decode": (array(q_dtype, 4), array(cache_dtype, 4, "A"), array(cache_dtype, 4, "A"),
                           types.Array(i32, 2, "C"), i64, array("int64", 1), i64, scalar,
                           array(acc, 4), array(acc, 3)),
        "merge_splits": (array(acc, 4), array(acc, 3), array(q_dtype, 4), array(q_dtype, 3)),
        "rope": (array(q_dtype, 4, "A"), array(q_dtype, 4, "A"), array(q_dtype, 4, "A"), types.boolean,
                 array(q_dtype, 4)),
        # The decode step's kernels: activations in q's dtype, the cache in its own.
        "rope_write_kv": (array(q_dtype, 2), array(q_dtype, 2), array(q_dtype, 2), array("int64", 1),
                          types.Array(i32, 2, "C"), i64, i64, i64, types.boolean, array(q_dtype, 4),
                          array(cache_dtype, 4), array(cache_dtype, 4)),
        "add_rms_norm": (array(q_dtype, 2), array(q_dtype, 2), array(q_dtype, 1), scalar, scalar, types.boolean,
                         array(q_dtype, 2)),
        "swiglu": (array(q_dtype, 2), array(q_dtype, 2)),
        "advance_lengths": (array("int64", 1),),
        "gemv_partial": (array(q_dtype, 2), array(q_dtype, 2), array(acc, 3), i64),
        "gemv_reduce": (array(acc, 3), array(q_dtype, 1), types.boolean, array(q_dtype, 2)),
        "embed_rows": (array(q_dtype, 2), array("int64", 1), array(q_dtype, 2)),
        "argmax_rows": (array(q_dtype, 2), array("int64", 1)),
    }
