# Source of lessons/02_rope.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 2: rotary position embeddings (RoPE)
#
# **What it teaches:** how RoPE encodes positions by rotating pairs of numbers, the two pair conventions
# (Hugging Face's and Meta's) and how to convert weights between them, and the position of a decoded token.
# **What it assumes:** lesson 1 (attention scores `q . k`); a rotation in the plane (cos, sin).
#
# Attention by itself has no idea of order: permute the keys and values together and the output does
# not change. LLaMA, Mistral and Qwen tell it where each token is by **rotating** queries and keys.
# Each head vector of `head_dim` numbers is cut into `head_dim / 2` **pairs**, and pair `p` of a token at
# position `pos` is rotated by the angle
#
# $$a_p(pos) = pos \cdot \theta^{-2p / d}, \qquad (x_1, x_2) \mapsto (x_1 \cos a - x_2 \sin a,\; x_1 \sin a + x_2 \cos a).$$
#
# In this lesson you will see the rotation, compare the **two pair conventions** in use, check the
# **relative-position property** numerically, get the **position offset** of a decoded token right,
# and fall into (then climb out of) the classic trap: running Hugging Face weights with the other
# convention gives wrong logits *without any error*.

# %%
import math
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt
from safetensors.numpy import load_file

import minikv
from minikv import rope
from minikv.checkpoint import load_checkpoint
from minikv.exercises import check

%matplotlib inline
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Rotating pairs, at many speeds
#
# `rope.inverse_frequencies(head_dim, theta)` gives the angle per position of each pair. Pair 0 turns by
# one radian per position; the last pair turns thousands of times slower. Fast pairs resolve nearby
# positions, slow pairs still tell apart tokens that are far apart.

# %%
head_dim, theta = 16, 10000.0
inv_freq = rope.inverse_frequencies(head_dim, theta)
print("angle per position of each pair:", inv_freq)
print("wavelength in positions (2 pi / angle):", 2 * math.pi / inv_freq)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
positions = np.arange(64)
angles = rope.rope_angles(positions, head_dim, theta)       # (64, head_dim/2)
for p in [0, 1, 2, 4, 7]:
    axes[0].plot(positions, np.cos(angles[:, p]), label=f"pair {p}")
axes[0].set_xlabel("position")
axes[0].set_ylabel("cos(angle)")
axes[0].set_title("each pair rotates at its own speed")
axes[0].legend(fontsize=8)

point = np.array([1.0, 0.3])
for p, marker in [(0, "o"), (3, "s")]:
    cos, sin = np.cos(angles[:12, p]), np.sin(angles[:12, p])
    rotated = np.stack([point[0] * cos - point[1] * sin, point[0] * sin + point[1] * cos], axis=1)
    axes[1].plot(rotated[:, 0], rotated[:, 1], marker + "-", label=f"pair {p}, positions 0..11")
axes[1].set_aspect("equal")
axes[1].set_title("one pair (1.0, 0.3) rotated to positions 0..11")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Which dimensions form a pair? Two conventions
#
# * `"half"` (Hugging Face's `rotate_half`): pair `p` is dimensions `(p, p + d/2)`.
# * `"interleaved"` (Meta's original LLaMA code, llama2.c): pair `p` is dimensions `(2p, 2p + 1)`.
#
# `rope.apply_rope(x, cos, sin, convention)` does either. Below, the same vector at position 1: each
# convention rotates different couples of numbers. Both keep the length of every pair (a rotation does).

# %%
head_dim = 8
x = np.arange(1.0, head_dim + 1)[None, :]                    # one token, (seq=1, head_dim)
cos, sin = rope.cos_sin_table(4, head_dim, theta, np.float64)
at_position = 1
for convention in ["half", "interleaved"]:
    y = rope.apply_rope(x, cos[at_position:at_position + 1], sin[at_position:at_position + 1], convention)
    if convention == "half":
        pairs = [(p, p + head_dim // 2) for p in range(head_dim // 2)]
    else:
        pairs = [(2 * p, 2 * p + 1) for p in range(head_dim // 2)]
    print(f"{convention:>12}: pairs {pairs}")
    print(f"{'':>12}  x        = {x[0]}\n{'':>12}  rotated  = {y[0]}")
    for a, b in pairs:
        assert np.isclose(np.hypot(x[0, a], x[0, b]), np.hypot(y[0, a], y[0, b]))   # length kept

# %% [markdown]
# ## 3. The relative-position property
#
# Rotate a query to position `m` and a key to position `n`. Their dot product is
# $\sum_p \|q_p\|\|k_p\| \cos(\phi_p + (m - n)\,\omega_p)$: it depends on `m - n` only. So attention
# scores see *how far apart* two tokens are, not where they are. Let us check numerically.

# %%
head_dim = 32
rng = np.random.default_rng(0)
q_vec, k_vec = rng.standard_normal(head_dim), rng.standard_normal(head_dim)
cos, sin = rope.cos_sin_table(2048, head_dim, theta, np.float64)

def rotated(vec, pos):
    return rope.apply_rope(vec[None, :], cos[pos:pos + 1], sin[pos:pos + 1], "half")[0]

print(f"{'m (query)':>10} {'n (key)':>8} {'m - n':>6} {'q_m . k_n':>12}")
for m, n in [(5, 2), (105, 102), (1005, 1002), (7, 7), (1500, 1500), (2, 5), (1002, 1005)]:
    print(f"{m:>10} {n:>8} {m - n:>6} {rotated(q_vec, m) @ rotated(k_vec, n):>12.6f}")

distances = np.arange(-200, 201)
dots_at_300 = [rotated(q_vec, 300 + dist) @ rotated(k_vec, 300) for dist in distances]
dots_at_1000 = [rotated(q_vec, 1000 + dist) @ rotated(k_vec, 1000) for dist in distances]
assert np.allclose(dots_at_300, dots_at_1000, atol=1e-9)

plt.figure(figsize=(7, 3.5))
plt.plot(distances, dots_at_300, label="key at position 300")
plt.plot(distances, dots_at_1000, "--", label="key at position 1000")
plt.xlabel("m - n (query position minus key position)")
plt.ylabel("rotated q . rotated k")
plt.title("the score depends only on the distance")
plt.legend()
plt.show()

# %% [markdown]
# ## 4. Position offsets during decoding
#
# When a model decodes token number 10 with a KV cache, only that one token goes through the layers,
# but it must be rotated as position **10**, not 0: its key is stored rotated, and the cached keys were
# rotated at their own positions. minikv takes the position from the cache length
# (`model.forward(ids, cache=cache)`; or pass `positions=` explicitly).
#
# We use a tiny random LLaMA checkpoint that ships with minikv (`minikv/data/hf-examples/`; it has no
# tokenizer, so we feed token ids) and compare three ways to get the logits of token 10: recompute
# everything, decode with the right position, decode pretending it is position 0.

# %%
FIXTURE = Path(minikv.__file__).parent / "data" / "hf-examples" / "llama_gqa"
model = minikv.load(FIXTURE, dtype="float64")
print(model)
ids = np.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]])

full = model.forward(ids)                                    # no cache: recompute all 11 positions

cache = model.new_cache("static", batch_size=1, max_seq_len=32)
model.forward(ids[:, :10], cache=cache)                      # prefill positions 0..9
right = model.forward(ids[:, 10:], cache=cache)              # position = cache length = 10

cache = model.new_cache("static", batch_size=1, max_seq_len=32)
model.forward(ids[:, :10], cache=cache)
wrong = model.forward(ids[:, 10:], cache=cache, positions=np.array([[0]]))   # forgot the offset

print("max |decode at position 10 - recompute| =", np.abs(right[0, -1] - full[0, -1]).max())
print("max |decode at position 0  - recompute| =", np.abs(wrong[0, -1] - full[0, -1]).max())
assert np.allclose(right[0, -1], full[0, -1], atol=1e-12)

# %% [markdown]
# ## 5. The trap: the wrong convention gives plausible, wrong logits
#
# A checkpoint's `W_q` and `W_k` are laid out for one convention. Hugging Face LLaMA weights expect
# `"half"`. Run them with the `"interleaved"` rotation and nothing crashes: shapes are identical, the
# logits look like logits. They are just wrong. The example folder also stores the logits Hugging Face
# `transformers` computed, so we can measure how wrong.

# %%
expected = load_file(FIXTURE / "expected.safetensors")       # input_ids (2, 11), float64 logits
config, weights = load_checkpoint(FIXTURE, dtype="float64")
print("the checkpoint's convention:", config.rope_convention)

good = minikv.Transformer(config, weights, dtype="float64")
bad = minikv.Transformer(config.replace(rope_convention="interleaved"), weights, dtype="float64")

def report(name, logits):
    err = np.abs(logits - expected["logits"]).max()
    agree = (logits.argmax(-1) == expected["logits"].argmax(-1)).mean()
    print(f"{name:<40} max |logits - HF| = {err:9.2e}   top-1 agrees with HF on {agree:6.1%} of positions")
    return err

_ = report("half (correct)", good.forward(expected["input_ids"]))
_ = report("interleaved, same weights (the trap)", bad.forward(expected["input_ids"]))

# %% [markdown]
# Worse, the error is **zero at position 0** (a rotation by angle 0 is the identity in either
# convention), so a quick test on a one-token prompt passes. Error per position:

# %%
per_position = np.abs(bad.forward(expected["input_ids"]) - expected["logits"]).max(axis=(0, 2))
plt.figure(figsize=(6, 3))
plt.bar(np.arange(len(per_position)), per_position)
plt.xlabel("position")
plt.ylabel("max |logit error|")
plt.title("wrong RoPE convention: exact at position 0, wrong after")
plt.show()
assert per_position[0] < 1e-12 and per_position[1:].min() > 1e-3

# %% [markdown]
# **The fix** is not to change the rotation but to permute the rows of `W_q` and `W_k` (per head) so
# that the numbers the interleaved rotation pairs up are the ones the half rotation paired up. The
# dot product `q . k` is a sum over dimensions: permuting q and k the same way only reorders that sum.
# `rope.interleaved_to_half_permutation(head_dim)` is that permutation, and
# `rope.convert_rope_convention` applies it to every layer.

# %%
perm = rope.interleaved_to_half_permutation(config.head_dim)
print("half layout dimension r comes from interleaved dimension perm[r]:", perm)

converted_weights, converted_config = rope.convert_rope_convention(weights, config, to="interleaved")
fixed = minikv.Transformer(converted_config, converted_weights, dtype="float64")
err = report("interleaved, permuted weights (fixed)", fixed.forward(expected["input_ids"]))
assert err < 1e-10

# %% [markdown]
# `model.with_rope_convention("interleaved")` does the same in one call. The lesson: when you port
# weights between codebases, compare logits with the original implementation at **several positions**,
# never just the first.
#
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/02_rope.py`](solutions/02_rope.py).
#
# **Exercise 1.** Write the interleaved rotation by hand with a loop over pairs (pair `p` is dimensions
# `2p, 2p+1`) for a vector at position `pos`, and check it equals `rope.apply_rope(..., "interleaved")`.

# %%
head_dim, pos = 8, 5
vec = rng.standard_normal(head_dim)

# --- your solution ---
def rope_interleaved_by_hand(x, pos, theta=10000.0):
    """x: (head_dim,). Rotate each pair (x[2p], x[2p+1]) by the angle pos * theta ** (-2p / head_dim)."""
    raise NotImplementedError("exercise 1: write the loop over pairs")
# --- check ---
with check(1, rope_interleaved_by_hand):
    cos, sin = rope.cos_sin_table(16, head_dim, 10000.0, np.float64)
    library = rope.apply_rope(vec[None], cos[pos:pos + 1], sin[pos:pos + 1], "interleaved")[0]
    assert np.allclose(rope_interleaved_by_hand(vec, pos), library, atol=1e-12)

# %% [markdown]
# **Exercise 2.** For `head_dim = 64` and `theta = 10000`, how many positions does the *slowest* pair
# need to turn once (its wavelength)? Compute it from the formula, then check with `rope.inverse_frequencies`.

# %%
# --- your solution ---
slowest_wavelength = ...   # positions per full turn of the slowest pair (a float)
# --- check ---
with check(2, slowest_wavelength) as exercise:
    assert math.isclose(slowest_wavelength, 2 * math.pi / rope.inverse_frequencies(64, 10000.0)[-1], rel_tol=1e-12)
    exercise.note = f"the slowest pair turns once every {slowest_wavelength:,.0f} positions"

# %% [markdown]
# **Exercise 3.** The permutation links the two conventions for a single vector too: if `x_half = x_inter[perm]`
# then rotating `x_half` with `"half"` gives the same numbers as rotating `x_inter` with `"interleaved"`,
# reordered by `perm`. Check it for a random vector at position 7, and check that `np.argsort(perm)`
# undoes `perm`.

# %%
head_dim = 16
perm = rope.interleaved_to_half_permutation(head_dim)
x_inter = rng.standard_normal(head_dim)
cos, sin = rope.cos_sin_table(8, head_dim, 10000.0, np.float64)
c7, s7 = cos[7:8], sin[7:8]

# --- your solution ---
x_half = ...          # x_inter reordered by perm
rotated_half = ...    # x_half rotated at position 7 with "half"
rotated_inter = ...   # x_inter rotated at position 7 with "interleaved"
inverse = ...         # the permutation that undoes perm
# --- check ---
with check(3, x_half, rotated_half, rotated_inter, inverse):
    assert np.allclose(rotated_half, rotated_inter[perm], atol=1e-12)
    assert np.array_equal(x_half[inverse], x_inter)
