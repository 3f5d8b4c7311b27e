"""Solutions to the exercises of lesson 7 (lessons/src/07_real_checkpoints.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
row_sums = attn.sum(axis=-1)
above_diagonal = np.triu(np.ones((seq, seq), dtype=bool), k=1)

# %% exercise 2
error_with_window = np.abs(windowed.forward(expected["input_ids"]) - expected["logits"]).max()
no_window = minikv.Transformer(windowed.config.replace(sliding_window=None), windowed.weights, dtype="float64")
error_without_window = np.abs(no_window.forward(expected["input_ids"]) - expected["logits"]).max()

# %% exercise 3
with tempfile.TemporaryDirectory() as tmp:
    tiny.save(tmp)
    files = sorted(p.name for p in Path(tmp).iterdir())
    reloaded = minikv.load(tmp)
    same = np.array_equal(reloaded.forward(check_ids), tiny.forward(check_ids))
