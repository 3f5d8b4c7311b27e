"""Solutions to the exercises of lesson 8 (lessons/src/08_encoder_decoder.py).

Each block "# %% exercise N" replaces the stub between "# --- your solution ---" and "# --- check ---"
in exercise N's cell; python lessons/_build.py --solved builds the solved notebook."""

# %% exercise 1
alone = [t5.encode([src]) for src in sources]
gaps = [np.abs(states[b, :len(src)] - alone[b][0]).max() for b, src in enumerate(sources)]

# %% exercise 2
good = t5.new_cache("static", batch_size=2, max_seq_len=3)
got = t5.forward(target, encoder_states=states, cache=good, encoder_lengths=lengths)
wrong_states = np.stack([states[1], states[1]])
bad = t5.new_cache("static", batch_size=2, max_seq_len=3)
got_bad = t5.forward(target, encoder_states=wrong_states, cache=bad, encoder_lengths=np.array([lengths[1]] * 2))
