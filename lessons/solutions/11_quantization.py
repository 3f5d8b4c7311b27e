"""Solutions to the exercises of lesson 11 (lessons/src/11_quantization.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
int8_bits_group_64 = 8 + 32 / 64
int4_bits_group_128 = 4 + 32 / 128

# %% exercise 2
kv_int8_bytes = 2 * model.config.n_layers * model.config.n_kv_heads * (model.config.head_dim + 4)
