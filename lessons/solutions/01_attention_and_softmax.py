"""Solutions to the exercises of lesson 1 (lessons/src/01_attention_and_softmax.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
i, j = np.arange(6)[:, None], np.arange(6)[None, :]
window_mask = (j <= i) & (i - j < W)
s6 = np.where(window_mask, q6 @ k6.T / math.sqrt(4), -np.inf)
p6 = np.exp(s6 - s6.max(axis=1, keepdims=True))
out_window = (p6 / p6.sum(axis=1, keepdims=True)) @ v6

# %% exercise 2
out_1, lse_1 = attention.naive(qx, kx[:, :, :10], vx[:, :, :10], causal=False, return_lse=True)
out_2, lse_2 = attention.naive(qx, kx[:, :, 10:], vx[:, :, 10:], causal=False, return_lse=True)
lse_merged = np.logaddexp(lse_1, lse_2)
out_merged = np.exp(lse_1 - lse_merged)[..., None] * out_1 + np.exp(lse_2 - lse_merged)[..., None] * out_2

# %% exercise 3
with np.errstate(over="ignore"):
    first_inf_32 = next(x for x in range(1, 1000) if np.isinf(np.exp(np.float32(x))))
    first_inf_64 = next(x for x in range(1, 1000) if np.isinf(np.exp(np.float64(x))))
