"""Solutions to the exercises of lesson 6 (lessons/src/06_flash_decoding_and_gpu.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
empty_out, empty_lse = np.zeros_like(outs[0]), np.full_like(lses[0], -np.inf)
with_empty = attention.merge_partials(outs + [empty_out], lses + [empty_lse])
without = attention.merge_partials(outs, lses)

# %% exercise 2
def merge_two(out_a, lse_a, out_b, lse_b):
    lse = np.logaddexp(lse_a, lse_b)
    return np.exp(lse_a - lse)[..., None] * out_a + np.exp(lse_b - lse)[..., None] * out_b, lse


# %% exercise 3
start = max(0, L - W)
chunk = -(-(L - start) // n_splits)
ranges = [(start + p * chunk, min(start + (p + 1) * chunk, L)) for p in range(n_splits)]
