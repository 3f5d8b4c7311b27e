"""Solutions to the exercises of lesson 3 (lessons/src/03_kv_cache.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
bytes_fp32 = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4
bytes_fp16 = bytes_fp32 // 2

# %% exercise 2
per_position_per_layer = config.n_kv_heads * config.head_dim * 4          # one K row of one layer, float32
# decode step i (1..n) copies 2 arrays (K, V) of P + i - 1 positions in every layer
predicted = sum(2 * config.n_layers * (P + i - 1) * per_position_per_layer for i in range(1, n + 1))

# %% exercise 3
succeeded = 0
try:
    while True:
        model.forward(np.array([[66]]), cache=cache)
        succeeded += 1
except minikv.CacheOverflowError as error:
    message = str(error)
