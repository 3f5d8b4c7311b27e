# Source of lessons/10_speculative_decoding.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 10: speculative decoding
#
# **What it teaches:** speculative decoding (a draft model or prompt lookup proposes, one forward
# checks), the rejection rule that keeps sampling exact, rewinding the cache, and when it pays.
# **What it assumes:** lessons 3-5, and lesson 4's sampling (softmax, temperature).
#
# A decode step reads every weight of the model to make **one** token per sequence (lesson 4). Feeding
# the model five tokens at once costs little more than feeding one: the weights are read once either
# way. So if a cheap guesser could *propose* the next few tokens, one forward of the model could
# *check* them all.
#
# That is speculative decoding (Leviathan et al. 2023; Chen et al. 2023):
#
# 1. a **proposer** guesses `k` tokens `d_1 .. d_k`: a small **draft model**, or **prompt lookup**
#    (copy what followed the last few tokens the previous time they appeared);
# 2. the model runs **one** forward over `[last, d_1, .., d_k]` and gets its own next-token
#    distribution `p_0 .. p_k` at every position;
# 3. it keeps the proposals it agrees with, adds one token of its own, and **rewinds** its KV cache
#    past the rest (`cache.truncate`).
#
# In this lesson you will do one step by hand, check that greedy speculative decoding makes exactly
# the model's own tokens, see *why* sampling stays exact (the rejection rule), and measure when it pays
# and when it does not.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt

import minikv
from minikv import speculative
from minikv.speculative import BUNDLED_DRAFT
from minikv.exercises import check

%matplotlib inline

# float64: the verification forward (k + 1 tokens at once) and a one-token step round differently in
# float32, and a near-tie could flip a token; in float64 the comparison is exact.
model = minikv.load(dtype="float64")
draft = minikv.load(BUNDLED_DRAFT, dtype="float64")
tokenizer = model.tokenizer
print(model)
print(draft)
print(f"the draft has {draft.n_parameters / model.n_parameters:.0%} of the model's parameters")

# %% [markdown]
# ## 1. One speculative step by hand (greedy)
#
# Both models keep a cache holding every token but the last one. The draft proposes `k = 4` tokens,
# one cheap decode step each; the model verifies all of them in **one** forward; both caches are
# rewound past what the model rejected. Watch a few steps:

# %%
def speculative_step(history, cache, draft_cache, k):
    """One greedy step: the caches hold history[:-1]; returns the new tokens (1 to k + 1 of them)."""
    # The draft catches up on what it has not seen (all but the last token), then proposes k tokens.
    seen = int(draft_cache.lengths[0])
    if seen < len(history) - 1:
        draft.forward(np.array([history[seen:-1]]), cache=draft_cache)
    proposal, token = [], history[-1]
    for _ in range(k):
        token = int(draft.forward(np.array([[token]]), cache=draft_cache, last_only=True).argmax())
        proposal.append(token)
    # The model verifies: ONE forward of [last, d_1 .. d_k] -> its own choice at each of the k + 1 positions
    logits = model.forward(np.array([[history[-1]] + proposal]), cache=cache)     # (1, k + 1, vocab)
    choices = logits[0].argmax(axis=-1)
    n_accepted = 0
    while n_accepted < k and proposal[n_accepted] == choices[n_accepted]:
        n_accepted += 1
    new_tokens = proposal[:n_accepted] + [int(choices[n_accepted])]
    print(f"draft {tokenizer.decode(proposal)!r:10} model {tokenizer.decode(choices.tolist())!r:10} -> accepted "
          f"{n_accepted} of {k}, {len(new_tokens)} new: {tokenizer.decode(new_tokens)!r:8}", end="  ")
    # Rewind both caches past the rejected proposals: keep the history and the accepted ones.
    print(f"cache lengths model {int(cache.lengths[0])} draft {int(draft_cache.lengths[0])}", end=" -> ")
    keep = len(history) + n_accepted
    cache.truncate([keep])
    draft_cache.truncate([min(int(draft_cache.lengths[0]), keep)])
    print(f"{int(cache.lengths[0])} and {int(draft_cache.lengths[0])}")
    return new_tokens

history = tokenizer.encode("The meaning of life is ")
cache = model.new_cache("static", max_seq_len=128)
draft_cache = draft.new_cache("static", max_seq_len=128)
model.forward(np.array([history[:-1]]), cache=cache)        # everything but the last token
while len(history) < 60:
    history += speculative_step(history, cache, draft_cache, k=4)
print(repr(tokenizer.decode(history)))

# %% [markdown]
# The model's last choice (`choices[n_accepted]`) is always kept: even when every proposal is wrong,
# a step makes one token, like plain decoding. Each kept token is the model's own argmax given the
# tokens before it, which are themselves the model's, so the output is exactly plain greedy
# decoding. `model.generate(..., speculative=draft)` runs this loop (with ragged batches, every cache
# kind and sampling); check that it makes the same tokens as plain decoding, by hand and by `generate`:

# %%
prompt_length = len(tokenizer.encode("The meaning of life is "))
by_hand = history[prompt_length:]
assert by_hand == model.generate("The meaning of life is ", max_new_tokens=len(by_hand)).tokens[0]

text = "A man "
plain = model.generate(text, max_new_tokens=60)
with_draft = model.generate(text, max_new_tokens=60, speculative=draft, num_speculative_tokens=4)
with_lookup = model.generate(text, max_new_tokens=60, speculative="prompt_lookup", num_speculative_tokens=4)
assert with_draft.tokens == plain.tokens == with_lookup.tokens
print(repr(plain.text))
for name, out in (("draft model", with_draft), ("prompt lookup", with_lookup)):
    s = out.stats
    print(f"{name:13s}: {s.accepted_tokens}/{s.proposed_tokens} proposals accepted "
          f"({s.acceptance_rate:.0%}), {s.mean_accepted_length:.2f} per verification forward")

# %% [markdown]
# ## 2. Why sampling stays exact: the rejection rule
#
# When sampling, the draft draws `x ~ q` and the model has `p`. The rule: **accept `x` with
# probability `min(1, p(x) / q(x))`; on a rejection draw from `r = max(0, p - q)`, normalised.**
#
# The first token is `x` either because the draft proposed `x` and it was accepted, or because the
# draft was rejected and `x` was drawn from `r`:
#
# $$P(x) = q(x)\min\Big(1, \frac{p(x)}{q(x)}\Big) + \Big(1 - \sum_y \min(p(y), q(y))\Big)\frac{\max(0, p(x) - q(x))}{\sum_y \max(0, p(y) - q(y))}$$
#
# The first term is `min(p(x), q(x))`. Since `sum_y max(0, p - q) = sum_y (p - min(p, q)) = 1 - sum_y min(p, q)`,
# the second term is `max(0, p(x) - q(x))`, and `min(p, q) + max(0, p - q) = p`. **Whatever the draft,
# every token is drawn from the model's own distribution**: a bad draft costs speed, never quality.
#
# Check it: the formula, then 20,000 draws through `minikv.speculative.verify_sampled`, and a wrong rule
# (accept everything) for contrast.

# %%
rng = np.random.default_rng(0)
p = np.array([0.45, 0.25, 0.15, 0.10, 0.05])        # the model
q = np.array([0.05, 0.10, 0.15, 0.25, 0.45])        # a draft that is wrong about almost everything
exact = np.minimum(p, q) + (1 - np.minimum(p, q).sum()) * speculative.residual(p[None], q[None])[0]
assert np.allclose(exact, p)

n = 20_000
draft_tokens = rng.choice(5, size=(n, 1), p=q)
P = np.broadcast_to(np.stack([p, p]), (n, 2, 5))      # p at the proposal and after it (the bonus token)
Q = np.broadcast_to(q, (n, 1, 5))
n_acc, nxt = speculative.verify_sampled(P, draft_tokens, np.ones(n, dtype=np.int64), Q, rng)
first = np.where(n_acc == 1, draft_tokens[:, 0], nxt)
empirical = np.bincount(first, minlength=5) / n
always = np.bincount(draft_tokens[:, 0], minlength=5) / n     # "accept everything": the draft's q

print(f"accepted {n_acc.mean():.0%} of proposals (sum of min(p, q) = {np.minimum(p, q).sum():.2f})\n")
print("| token | p (model) | q (draft) | speculative, 20k draws | accept-always |")
print("|---|---|---|---|---|")
for t in range(5):
    print(f"| {t} | {p[t]:.3f} | {q[t]:.3f} | {empirical[t]:.3f} | {always[t]:.3f} |")

x = np.arange(5)
plt.figure(figsize=(7, 3))
for offset, values, label in ((-0.3, p, "p: the model"), (-0.1, empirical, "speculative (rejection rule)"),
                              (0.1, always, "accept always (wrong)"), (0.3, q, "q: the draft")):
    plt.bar(x + offset, values, width=0.2, label=label)
plt.xlabel("token"); plt.ylabel("probability"); plt.legend(fontsize=8); plt.title("first sampled token")
plt.show()

# %% [markdown]
# Prompt lookup proposes deterministically: its `q` is a point mass at `x`. Then the rule accepts with
# probability `p(x)`, and the residual `max(0, p - onehot(x))` is `p` with `x` removed, renormalised.
#
# ## 3. When does it pay?
#
# A step costs one model forward over `k + 1` tokens plus the proposer's work (for a draft: `k` small
# forwards). If each proposal is accepted with probability `a` (independently), a step makes on average
#
# $$E[\text{tokens}] = 1 + a + a^2 + \dots + a^k = \frac{1 - a^{k+1}}{1 - a}.$$
#
# Measure the costs on this machine, then predict the speedup over plain decoding for every `a` and `k`.

# %%
def seconds_per_call(m, n_tokens, repeats=20):
    c = m.new_cache("static", max_seq_len=64)
    m.forward(np.arange(65, 97)[None, :], cache=c)         # 32 tokens of context
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m.forward(np.full((1, n_tokens), 65), cache=c)
        times.append(time.perf_counter() - t0)
        c.truncate([32])
    return min(times)      # the fastest of the repeats: the one least disturbed by anything else running

fast_model, fast_draft = minikv.load(), minikv.load(BUNDLED_DRAFT)    # float32 for timing
t_model = {n: seconds_per_call(fast_model, n) for n in (1, 3, 5, 9)}
t_draft = seconds_per_call(fast_draft, 1)
print("| forward of | model ms | draft ms |")
print("|---|---|---|")
for n_tok, t in t_model.items():
    print(f"| {n_tok} token(s) | {t * 1e3:.2f} | {t_draft * 1e3 if n_tok == 1 else float('nan'):.2f} |")

def expected_tokens(a, k):
    return sum(a ** i for i in range(k + 1))

alphas = np.linspace(0, 0.95, 40)
plt.figure(figsize=(7, 3.5))
for k_ in (2, 4, 8):
    verify = np.interp(k_ + 1, list(t_model), list(t_model.values()))
    step = verify + k_ * t_draft
    plt.plot(alphas, [expected_tokens(a, k_) * t_model[1] / step for a in alphas], label=f"draft model, k={k_}")
    plt.plot(alphas, [expected_tokens(a, k_) * t_model[1] / verify for a in alphas], "--",
             label=f"free proposer (lookup), k={k_}")
plt.axhline(1, color="k", lw=0.8)
plt.xlabel("acceptance probability a"); plt.ylabel("predicted speedup"); plt.legend(fontsize=7)
plt.title("speculative decoding pays above the line")
plt.show()

# %% [markdown]
# Below the line it **loses**: the proposer's work and the longer verification forward cost more than
# the tokens they save. The table above says where the cost is on this model: a draft forward is cheap
# (about a seventh of a model step), but a verification forward of several tokens costs about twice a
# one-token step (its matmuls are matrix-matrix products, and its attention takes the masked prefill
# path instead of the decode kernel). So even a free proposer needs about one accepted token per step
# just to break even, and a draft with a low acceptance loses. Prompt lookup costs almost nothing, so it
# pays when its guesses are often right, which happens when the text repeats itself. Measured end to end:

# %%
passage = "A journey of a thousand miles begins with a single step.\n"
texts = {"fortune prompt": "Life is ", "repetitive": passage + passage + passage[:20]}
print("| text | proposer | tokens/s | speedup | accepted |")
print("|---|---|---|---|---|")
for text_name, prompt_text in texts.items():
    base = None
    for name, option in (("plain", None), ("prompt lookup", "prompt_lookup"), ("draft model", fast_draft)):
        extra = {} if option is None else {"speculative": option, "num_speculative_tokens": 4}
        t0 = time.perf_counter()
        out = fast_model.generate(prompt_text, max_new_tokens=60, stop_tokens=[], **extra)
        seconds = time.perf_counter() - t0
        base = base or seconds
        rate = "" if option is None else f"{out.stats.acceptance_rate:.0%}"
        print(f"| {text_name} | {name} | {60 / seconds:.0f} | {base / seconds:.2f}x | {rate} |")

# %% [markdown]
# (One run each on whatever else this machine is doing; `benchmarks/speculative.py` measures every k
# with repeats.)
#
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/10_speculative_decoding.py`](solutions/10_speculative_decoding.py).
#
# **Exercise 1.** A proposer whose guesses are each accepted with probability `a = 0.8`, `k = 4`:
# how many tokens does a step make on average? Check your closed form against the sum.

# %%
a, k_ = 0.8, 4

# --- your solution ---
mean_tokens = ...   # the expected tokens per step, in closed form (a float)
# --- check ---
with check(1, mean_tokens) as exercise:
    assert abs(mean_tokens - expected_tokens(a, k_)) < 1e-12
    assert abs(mean_tokens - 3.3616) < 1e-12
    exercise.note = f"{mean_tokens:.4f} tokens per step"

# %% [markdown]
# **Exercise 2.** Prompt lookup proposed token `x = 0` for the distribution `p` above (a point mass
# `q`). Write the residual a rejection draws from, check it against `speculative.residual`, and check
# that the overall chance of each token, `p(x) * [t == x] + (1 - p(x)) * residual(t)`, is `p(t)`.

# %%
# --- your solution ---
residual_by_hand = ...   # (5,): the distribution a rejection of x = 0 draws from
overall = ...            # (5,): the chance of each token overall
# --- check ---
with check(2, residual_by_hand, overall) as exercise:
    assert np.allclose(residual_by_hand, speculative.residual(p[None], np.eye(5)[[0]])[0])
    assert np.allclose(overall, p)
    exercise.note = str(np.round(residual_by_hand, 3))
