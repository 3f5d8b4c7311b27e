"""Solutions to the exercises of lesson 10 (lessons/src/10_speculative_decoding.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
mean_tokens = (1 - a ** (k_ + 1)) / (1 - a)

# %% exercise 2
residual_by_hand = p.copy()
residual_by_hand[0] = 0
residual_by_hand /= residual_by_hand.sum()
overall = (1 - p[0]) * residual_by_hand
overall[0] += p[0]
