"""Solutions to the exercises of lesson 2 (lessons/src/02_rope.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
def rope_interleaved_by_hand(x, pos, theta=10000.0):
    out = np.empty_like(x)
    for p in range(len(x) // 2):
        angle = pos * theta ** (-2 * p / len(x))
        x1, x2 = x[2 * p], x[2 * p + 1]
        out[2 * p] = x1 * math.cos(angle) - x2 * math.sin(angle)
        out[2 * p + 1] = x1 * math.sin(angle) + x2 * math.cos(angle)
    return out

# %% exercise 2
slowest_wavelength = 2 * math.pi * 10000.0 ** ((64 - 2) / 64)

# %% exercise 3
x_half = x_inter[perm]
rotated_half = rope.apply_rope(x_half[None], c7, s7, "half")[0]
rotated_inter = rope.apply_rope(x_inter[None], c7, s7, "interleaved")[0]
inverse = np.argsort(perm)
