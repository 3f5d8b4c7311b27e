"""Solutions to the exercises of lesson 9 (lessons/src/09_serving.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
shared_blocks = 13 // 4          # only *full* blocks are named by a hash, so the partial fourth is not shared

# %% exercise 2
broken = Engine(model, block_size=8)
broken.blocks.hash_of = lambda parent, tokens: block_hash(None, tokens)
broken.generate([x + tokenizer.encode(" w")], max_tokens=4)          # caches block "x" at positions 0..7
broken.generate([prompts[0]], max_tokens=4)                          # caches block "y" at positions 0..7
wrong = broken.generate([prompts[1]], max_tokens=12)[0]              # takes "y" for its positions 8..15
