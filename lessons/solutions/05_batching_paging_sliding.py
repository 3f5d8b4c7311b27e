"""Solutions to the exercises of lesson 5 (lessons/src/05_batching_paging_sliding.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
def padding_fraction(batches):
    slots = sum(len(batch) * max(batch) for batch in batches)
    return 1 - sum(sum(batch) for batch in batches) / slots

one_batch = padding_fraction([lens.tolist()])
sorted_lens = sorted(lens.tolist())
two_batches = padding_fraction([sorted_lens[:3], sorted_lens[3:]])

# %% exercise 2
pos = 20
v_from_pages = paged.v_pool[2][paged.block_table[0, pos // 8], :, pos % 8]

# %% exercise 3
slot_of_37 = 37 % 16
position_in_slot_3 = max(p for p in range(40) if p % 16 == 3)
