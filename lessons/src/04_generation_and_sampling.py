# Source of lessons/04_generation_and_sampling.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 4: generation and sampling
#
# **What it teaches:** prefill versus decode (measured), and how each sampling rule (temperature, top-k,
# top-p, min-p, repetition penalty) reshapes the next-token distribution; seeds and streaming.
# **What it assumes:** lesson 3 (the model, its logits and the KV cache); probabilities and the softmax.
#
# Generation has two phases:
#
# * **prefill**: the whole prompt goes through the model in one forward pass (a matrix of tokens per
#   matmul: the CPU or GPU is busy computing);
# * **decode**: one token at a time, each step reading *every* weight to produce one token per sequence
#   (the hardware mostly waits for memory).
#
# After each step the **sampler** turns the last row of logits into the next token. In this lesson you
# will time both phases, see what greedy, temperature, top-k, top-p, min-p and the repetition penalty do
# to the distribution (and how much probability mass each keeps), check that a seed makes sampling
# repeatable, and stream tokens as they are made.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt

import minikv
from minikv import sampling
from minikv.sampling import SamplingParams
from minikv.exercises import check

%matplotlib inline

model = minikv.load()
tokenizer = model.tokenizer
print(model)

# %% [markdown]
# ## 1. Prefill versus decode
#
# The same `P` prompt tokens go into the cache two ways: in one forward call (prefill), or one token per
# call (as decode would). Same result, very different speed.

# %%
text = ("Do not meddle in the affairs of wizards, for they are subtle and quick to anger. "
        "A journey of a thousand miles begins with a single step. ") * 3
all_ids = np.array([tokenizer.encode(text)])

def seconds_of(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

rows = []
for P in [16, 64, 256]:
    ids = all_ids[:, :P]
    def prefill():
        cache = model.new_cache("static", max_seq_len=P)
        return model.forward(ids, cache=cache, last_only=True)
    def one_by_one():
        cache = model.new_cache("static", max_seq_len=P)
        for t in range(P):
            logits = model.forward(ids[:, t:t + 1], cache=cache, last_only=True)
        return logits
    assert np.allclose(prefill(), one_by_one(), atol=1e-4)
    prefill_s = min(seconds_of(prefill) for _ in range(3))
    decode_s = seconds_of(one_by_one)
    rows.append((P, P / prefill_s, P / decode_s))

print("| prompt tokens | prefill tokens/s | one-at-a-time tokens/s | ratio |\n|---|---|---|---|")
for P, prefill_tps, decode_tps in rows:
    print(f"| {P} | {prefill_tps:,.0f} | {decode_tps:,.0f} | {prefill_tps / decode_tps:.1f}x |")

plt.figure(figsize=(6, 3.5))
x = np.arange(len(rows))
plt.bar(x - 0.2, [r[1] for r in rows], width=0.4, label="prefill (one call)")
plt.bar(x + 0.2, [r[2] for r in rows], width=0.4, label="one token per call")
plt.xticks(x, [f"P = {r[0]}" for r in rows])
plt.yscale("log")
plt.ylabel("tokens per second")
plt.legend()
plt.title("The same tokens, prefilled or decoded")
plt.show()

# %% [markdown]
# `model.generate` times the two phases separately in `out.stats`:

# %%
out = model.generate("A journey of a thousand miles", max_new_tokens=40, temperature=0.0)
print(repr(out.text))
print(out.stats)
print(f"prefill: {out.stats.prefill_tokens_per_s:,.0f} tokens/s, decode: {out.stats.decode_tokens_per_s:,.0f} tokens/s")

# %% [markdown]
# ## 2. The distribution the sampler starts from
#
# The model's last row of logits `z` (one number per byte value) becomes probabilities with
# `p = softmax(z)`. Here are the most likely next bytes after a prompt.

# %%
prompt = "The best way to predict the future is to"
logits = model.forward(np.array([tokenizer.encode(prompt)]), last_only=True)      # (1, 256)
probs = sampling.softmax(logits)[0]
order = np.argsort(-probs)
print(f"after {prompt!r}:")
for token in order[:8]:
    print(f"   {tokenizer.decode([token])!r:>8}  p = {probs[token]:.3f}")

# %% [markdown]
# ## 3. Temperature, top-k, top-p, min-p: what each keeps
#
# * **temperature** `T`: `softmax(z / T)`; `T < 1` sharpens, `T > 1` flattens, `T = 0` means greedy (argmax).
# * **top-k**: keep the `k` most likely tokens.
# * **top-p** (nucleus): keep the smallest set of most likely tokens whose mass reaches `p`.
# * **min-p**: keep tokens with `p_i >= min_p * p_max`: the cut-off follows the model's confidence.
#
# Every filter returns new logits with `-inf` where a token is removed. Below we chain them by hand in the
# order `sampling.sample` uses (top-k, temperature, top-p, min-p), count the survivors, and check our kept
# mass against `sampling.kept_mass`, which measures how much of the temperature-scaled distribution survives.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
ranks = np.arange(1, 31)
for T in [0.5, 1.0, 1.5]:
    p_T = sampling.softmax(sampling.apply_temperature(logits, T))[0]
    axes[0].plot(ranks, np.sort(p_T)[::-1][:30], "o-", ms=3, label=f"T = {T}")
axes[0].set_xlabel("rank of the token")
axes[0].set_ylabel("probability")
axes[0].set_yscale("log")
axes[0].set_title("temperature reshapes the distribution")
axes[0].legend()

settings = {
    "top_k=3": SamplingParams(top_k=3),
    "top_k=10": SamplingParams(top_k=10),
    "top_p=0.5": SamplingParams(top_p=0.5),
    "top_p=0.9": SamplingParams(top_p=0.9),
    "min_p=0.05": SamplingParams(min_p=0.05),
    "min_p=0.2": SamplingParams(min_p=0.2),
    "T=0.7, top_p=0.9": SamplingParams(temperature=0.7, top_p=0.9),
}
print("| setting | tokens kept | mass kept |\n|---|---|---|")
masses = []
for name, params in settings.items():
    filtered = sampling.top_k_filter(logits, params.top_k) if params.top_k else logits
    filtered = sampling.apply_temperature(filtered, params.temperature)
    if params.top_p:
        filtered = sampling.top_p_filter(filtered, params.top_p)
    if params.min_p:
        filtered = sampling.min_p_filter(filtered, params.min_p)
    kept = int(np.isfinite(filtered).sum())
    mass = float(sampling.kept_mass(logits, params)[0])
    # the same number by hand: the temperature-scaled probabilities of the surviving tokens
    base = sampling.softmax(sampling.apply_temperature(logits, params.temperature))
    assert abs(base[np.isfinite(filtered)].sum() - mass) < 1e-5
    masses.append(mass)
    print(f"| {name} | {kept} | {mass:.3f} |")
    if params.top_p:
        assert mass >= params.top_p - 1e-6                    # top-p keeps at least p

axes[1].barh(list(settings), masses)
axes[1].set_xlim(0, 1)
axes[1].set_xlabel("probability mass kept")
axes[1].set_title("what each filter keeps (this prompt)")
axes[1].invert_yaxis()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The repetition penalty
#
# For every token already in the sequence, `z -> z / r` if `z > 0` else `z * r` (with `r > 1` the logit
# always moves down). Here `r = 1.5` on the bytes of the prompt: mass moves from them to the other bytes.

# %%
previous = [np.array(tokenizer.encode(prompt))]
penalised = sampling.apply_repetition_penalty(logits, previous, 1.5)
p_before, p_after = probs, sampling.softmax(penalised)[0]
top = order[:10]
seen = np.isin(top, previous[0])
plt.figure(figsize=(8, 3.5))
plt.bar(np.arange(10) - 0.2, p_before[top], width=0.4, label="no penalty")
plt.bar(np.arange(10) + 0.2, p_after[top], width=0.4, label="penalty 1.5")
plt.xticks(np.arange(10), [f"{tokenizer.decode([t])!r}" + ("*" if s else "") for t, s in zip(top, seen)])
plt.ylabel("probability")
plt.title("next-byte probabilities (* = byte already in the prompt)")
plt.legend()
plt.show()
# The penalty moves every seen token's logit down and leaves the others' alone. (A seen token's
# *probability* can still rise, if other seen tokens lose even more: softmax renormalises.)
seen_ids = np.unique(previous[0])
unseen = np.setdiff1d(np.arange(logits.shape[-1]), seen_ids)
assert np.all(penalised[0, seen_ids] <= logits[0, seen_ids]) and np.array_equal(penalised[0, unseen], logits[0, unseen])

for r in [1.0, 1.3]:
    text_r = model.generate(prompt, max_new_tokens=60, temperature=0.0, repetition_penalty=r).text
    print(f"greedy, repetition_penalty={r}: {text_r!r}")

# %% [markdown]
# ## 5. Determinism by seed
#
# All randomness comes from one `numpy.random.Generator`; `seed=` creates it. The same seed gives the same
# text on every run with the same minikv, NumPy and BLAS library on the same machine. Across machines the
# random draws are still the same (NumPy's PCG64 generator is specified bit for bit), but the logits may
# differ in their last bits: BLAS libraries sum matrix products in different orders (by CPU, thread
# count and version), and float32 rounding differs with the order. Where two tokens are nearly tied,
# that can change a sampled token, and everything after it. So: reproducible here, usually but not
# always identical elsewhere (float64 makes a flip much less likely, not impossible).

# %%
def sampled(seed):
    return model.generate(prompt, max_new_tokens=50, temperature=0.8, top_p=0.95, seed=seed)

a, b, c = sampled(0), sampled(0), sampled(1)
print("seed 0:", repr(a.text))
print("seed 0:", repr(b.text))
print("seed 1:", repr(c.text))
assert a.tokens == b.tokens
assert a.tokens != c.tokens

# %% [markdown]
# ## 6. Streaming
#
# `model.stream(...)` yields a `TokenEvent(sequence, token, text)` as soon as each token is sampled, so a
# user sees the first words before the last is computed. After the loop, `.output` holds the same
# result `generate` would have returned.

# %%
stream = model.stream("Q: What is a computer?\nA:", max_new_tokens=60, temperature=0.0)
start = time.perf_counter()
arrival_ms, pieces = [], []
for event in stream:
    arrival_ms.append((time.perf_counter() - start) * 1e3)
    pieces.append(event.text)
    print(event.text, end="", flush=True)
print()
print(f"first token after {arrival_ms[0]:.1f} ms, last after {arrival_ms[-1]:.1f} ms")
same = model.generate("Q: What is a computer?\nA:", max_new_tokens=60, temperature=0.0)
assert stream.output.tokens == same.tokens and "".join(pieces) == same.text

# %% [markdown]
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/04_generation_and_sampling.py`](solutions/04_generation_and_sampling.py).
#
# **Exercise 1.** Write top-k by hand with `np.argsort`: keep the `k` largest logits of each row, set the
# rest to `-inf`. Check it against `sampling.top_k_filter` on the model's logits.

# %%
# --- your solution ---
def top_k_by_hand(z, k):
    """z: (rows, vocab). Keep the k largest logits of each row; set the rest to -inf."""
    raise NotImplementedError("exercise 1: use np.argsort")
# --- check ---
with check(1, top_k_by_hand):
    for k in [1, 5, 40]:
        assert np.array_equal(top_k_by_hand(logits, k), sampling.top_k_filter(logits, k))

# %% [markdown]
# **Exercise 2.** Write min-p by hand: keep token `i` iff `p_i >= min_p * max_j p_j`. Hint: that is the same
# as `z_i - max z >= log(min_p)`, no softmax needed. Check it against `sampling.min_p_filter`.

# %%
# --- your solution ---
def min_p_by_hand(z, min_p):
    """z: (rows, vocab). Keep z_i iff p_i >= min_p * max_j p_j; set the rest to -inf (keep z's dtype)."""
    raise NotImplementedError("exercise 2: compare z - max(z) with log(min_p)")
# --- check ---
with check(2, min_p_by_hand):
    for m in [0.0, 0.05, 0.3, 1.0]:
        assert np.array_equal(min_p_by_hand(logits, m), sampling.min_p_filter(logits, m))

# %% [markdown]
# **Exercise 3.** Sampling should draw token `i` with probability `softmax(z / T)_i`. Check it empirically:
# give `sampling.sample` a batch of 20,000 identical rows of 5 logits, `T = 0.7`, and compare the
# frequencies with the probabilities (they should agree to about 0.01).

# %%
z5 = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
T = 0.7

# --- your solution ---
draws = ...         # (20_000,) token ids from sampling.sample (SamplingParams(temperature=T), a seeded rng)
frequencies = ...   # (5,): how often each token was drawn, as fractions
expected = ...      # (5,): softmax(z5 / T)
# --- check ---
with check(3, draws, frequencies, expected):
    print("frequencies  ", np.round(frequencies, 4))
    print("probabilities", np.round(expected, 4))
    assert np.abs(frequencies - expected).max() < 0.015
