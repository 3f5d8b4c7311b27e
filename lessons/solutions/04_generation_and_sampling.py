"""Solutions to the exercises of lesson 4 (lessons/src/04_generation_and_sampling.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
def top_k_by_hand(z, k):
    out = np.full_like(z, -np.inf)
    keep = np.argsort(-z, axis=-1, kind="stable")[:, :k]
    np.put_along_axis(out, keep, np.take_along_axis(z, keep, axis=-1), axis=-1)
    return out

# %% exercise 2
def min_p_by_hand(z, min_p):
    keep = np.exp(z.astype(np.float64) - z.max(axis=-1, keepdims=True)) >= min_p
    return np.where(keep, z, -np.inf).astype(z.dtype)

# %% exercise 3
draws = sampling.sample(np.tile(z5, (20_000, 1)), SamplingParams(temperature=T), np.random.default_rng(0))
frequencies = np.bincount(draws, minlength=5) / len(draws)
expected = np.exp(z5 / T) / np.exp(z5 / T).sum()
