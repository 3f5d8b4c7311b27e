"""Speculative decoding (minikv/speculative.py) is exact.

* Greedy: ``generate(..., speculative=...)`` gives token for token what plain greedy ``generate`` gives,
  for every proposer (prompt lookup; a one-layer draft cut from the model; the model as its own
  draft, which accepts everything), k = 1..8, every cache kind and random ragged batches with stop
  tokens, the repetition penalty and chunked prefill (hypothesis, float64). A sliding ring that
  would wrap cannot rewind: CacheRewindError before any work. Two broken variants (accept every
  proposal; never rewind) are caught.
* Sampling: the empirical distribution of sampled tokens matches the model's own distribution by a
  chi-square test at significance 0.001, (a) through the verification function on fixed
  distributions and (b) through ``generate`` on a tiny random model (vocabulary 5, the joint of the
  first two tokens, computed exactly from the model; plain, top-k and repetition penalty). Critical
  values of the chi-square distribution at 0.001 (any statistics table): 5 degrees of freedom
  20.515, 8: 26.124, 24: 51.179. The same test fails for a deliberately wrong acceptance rule
  (accept every proposal).
* Rewind then re-feed == never having fed, for the draft model's cache (float64, 1e-10).
* The bundled draft, the README example, the command line and the benchmark's quick run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minikv
from hf_fixtures import FIXTURES, model_for, random_prompts
from minikv import speculative
from minikv.errors import CacheRewindError, ConfigError, InvalidInputError
from minikv.speculative import DraftModel, PromptLookup, verify_greedy, verify_sampled

KINDS = ("concat", "static", "paged", "sliding")
EXACT = 1e-10
# Chi-square quantiles at 1 - 0.001 by degrees of freedom, from a statistics table.
CHI2_CRITICAL_0001 = {5: 20.515, 8: 26.124, 24: 51.179}

_drafts: dict[str, minikv.Transformer] = {}


def draft_for(name: str) -> minikv.Transformer:
    """A smaller model with the same vocabulary: the fixture's first layer only (a different model)."""
    if name not in _drafts:
        model = model_for(name)
        weights = {n: w for n, w in model.weights.items() if not n.startswith("layers.1.")}
        _drafts[name] = minikv.Transformer(model.config.replace(n_layers=1), weights, dtype="float64")
    return _drafts[name]


def proposer_for(which: str, name: str):
    return {"prompt_lookup": "prompt_lookup", "draft": draft_for(name), "self": model_for(name)}[which]


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    assert expected.min() >= 5, "too few samples per cell for the chi-square approximation"
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("which", ["prompt_lookup", "draft", "self"])
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_greedy_speculative_equals_plain_greedy(which, data):
    name = data.draw(st.sampled_from(FIXTURES), label="model")
    kind = data.draw(st.sampled_from(KINDS), label="cache")
    k = data.draw(st.integers(1, 8), label="k")
    model = model_for(name)
    lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3), label="prompt lengths")
    prompts = random_prompts(model, lengths, data.draw(st.integers(0, 2**16), label="seed"))
    if data.draw(st.booleans(), label="repetitive prompts"):
        prompts = [(p[:3] * 6)[:len(p) + 8] for p in prompts]      # something for prompt lookup to find
    max_new = data.draw(st.integers(2, 20), label="max_new_tokens")
    stop = data.draw(st.one_of(st.none(), st.integers(0, model.config.vocab_size - 1)), label="stop token")
    penalty = data.draw(st.sampled_from([1.0, 1.3]), label="repetition penalty")
    options = {"stop_tokens": [] if stop is None else [stop], "repetition_penalty": penalty}
    needed = max(len(p) for p in prompts) + max_new - 1
    plain = model.generate(prompts, max_new_tokens=max_new, cache="static", **options)
    if kind == "sliding":
        options["window"] = needed
    ring = min(needed, model.config.sliding_window or needed)
    if kind == "sliding" and ring < needed:
        # The model's own window limits the ring: it would wrap, and a wrapped ring cannot rewind.
        with pytest.raises(CacheRewindError, match="window"):
            model.generate(prompts, max_new_tokens=max_new, cache=kind, speculative=proposer_for(which, name),
                           num_speculative_tokens=k, **options)
        return
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 5)), label="prefill chunk")
    out = model.generate(prompts, max_new_tokens=max_new, cache=kind, speculative=proposer_for(which, name),
                         num_speculative_tokens=k, prefill_chunk=chunk, **options)
    assert out.tokens == plain.tokens
    assert out.finish_reasons == plain.finish_reasons
    stats = out.stats
    assert 0 <= stats.accepted_tokens <= stats.proposed_tokens
    if which == "self":
        # The model is its own draft: every proposal is the model's own argmax.
        assert stats.accepted_tokens == stats.proposed_tokens


@pytest.mark.parametrize("broken", ["accept every proposal", "no rewind"])
def test_the_greedy_check_catches_a_broken_variant(monkeypatch, broken):
    model, prompts = model_for("llama_gqa"), [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5, 4, 5, 4]]
    plain = model.generate(prompts, max_new_tokens=8, stop_tokens=[])
    options = dict(max_new_tokens=8, stop_tokens=[], speculative="prompt_lookup", num_speculative_tokens=4,
                   max_seq_len=64)
    correct = model.generate(prompts, **options)
    assert correct.tokens == plain.tokens
    assert correct.stats.accepted_tokens < correct.stats.proposed_tokens      # there is something to reject
    if broken == "accept every proposal":
        monkeypatch.setattr(speculative, "verify_greedy",
                            lambda choices, draft, n_draft: (n_draft, choices[np.arange(len(n_draft)), n_draft]))
    else:
        # Rejected proposals stay in the model's cache (room checks off so that they fit).
        monkeypatch.setattr(minikv.cache.KVCache, "truncate", lambda self, lengths: None)
        monkeypatch.setattr(minikv.cache.KVCache, "check_room", lambda self, n_new: None)
    assert model.generate(prompts, **options).tokens != plain.tokens


def test_self_draft_makes_k_plus_one_tokens_per_step():
    model = model_for("llama_gqa")
    out = model.generate([[1, 2, 3]], max_new_tokens=13, speculative=model, num_speculative_tokens=3,
                         stop_tokens=[])
    # 13 tokens in steps of 4, 4, 4, 1 (the last step may propose only what max_new_tokens leaves room for).
    assert out.stats.verification_steps == 4
    assert out.stats.proposed_tokens == out.stats.accepted_tokens == 9
    assert out.stats.mean_accepted_length == 9 / 4
    assert "9/9 proposals accepted" in str(out.stats)


def test_greedy_verification_keeps_the_agreeing_prefix_and_the_models_next_token():
    # Row 0: proposals 5, 6 agree, 7 does not (the model wants 9): keep 5, 6 and add 9.
    # Row 1: one proposal, accepted: add the bonus token 4. Row 2: nothing proposed: the model's own 1.
    choices = np.array([[5, 6, 9, 0], [2, 4, 0, 0], [1, 0, 0, 0]])
    draft = np.array([[5, 6, 7], [2, 8, 8], [3, 3, 3]])
    n_accepted, next_token = verify_greedy(choices, draft, np.array([3, 1, 0]))
    assert n_accepted.tolist() == [2, 1, 0]
    assert next_token.tolist() == [9, 4, 1]


def test_a_sliding_ring_that_would_wrap_refuses_before_any_work():
    model = model_for("llama_gqa")
    with pytest.raises(CacheRewindError, match=r"window>=17"):
        model.generate([[1, 2, 3, 4, 5]], max_new_tokens=13, cache="sliding", window=8, speculative="prompt_lookup")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"cache": "none"}, ConfigError, "needs a KV cache"),
    ({"num_speculative_tokens": 0}, InvalidInputError, "num_speculative_tokens=0"),
    ({"num_speculative_tokens": True}, InvalidInputError, "num_speculative_tokens=True"),
    ({"speculative": "ngram"}, ConfigError, "prompt_lookup"),
    ({"speculative": 3}, ConfigError, "not a proposer"),
])
def test_bad_speculative_options_are_refused(kwargs, error, match):
    options = {"speculative": "prompt_lookup", **kwargs}
    with pytest.raises(error, match=match):
        model_for("llama_gqa").generate([[1, 2, 3]], max_new_tokens=4, **options)


def test_num_speculative_tokens_without_a_proposer_is_refused():
    with pytest.raises(ConfigError, match="num_speculative_tokens=3 applies to speculative decoding"):
        model_for("llama_gqa").generate([[1, 2, 3]], max_new_tokens=4, num_speculative_tokens=3)


def test_a_draft_with_another_vocabulary_or_a_given_cache_is_refused():
    model = model_for("llama_gqa")
    with pytest.raises(ConfigError, match="vocab_size=128"):
        model.generate([[1, 2, 3]], max_new_tokens=4, speculative=model_for("llama_mqa_tied"))
    with pytest.raises(ConfigError, match="not a KVCache"):
        model.generate([[1, 2, 3]], max_new_tokens=4, cache=model.new_cache("static", max_seq_len=16),
                       speculative="prompt_lookup")


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    lookup = PromptLookup(max_ngram=3)
    history = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2]
    # "7 1 2" occurred nowhere before; "1 2" last occurred at index 4, followed by 4 7 1 2.
    assert lookup.lookup(history, 3) == [4, 7, 1]
    # A longer n-gram wins over a later shorter one: "3 1 2" at index 0 beats "1 2" at index 4.
    assert lookup.lookup([3, 1, 2, 5, 1, 2, 6, 3, 1, 2], 2) == [5, 1]
    # The continuation may be shorter than k (the match sits near the end), or absent.
    assert lookup.lookup([5, 5], 4) == [5]
    assert lookup.lookup([1, 2, 3], 4) == []
    assert lookup.lookup([7], 4) == []


# ---------------------------------------------------------------------------------------------- sampling


def first_tokens(n_accepted, next_token, draft):
    return np.where(n_accepted >= 1, draft[:, 0], next_token)


def first_token_counts(deterministic: bool, n: int = 20000, vocab: int = 6):
    """Fixed p (the model) and q (the draft) over ``vocab`` tokens, k = 3, ``n`` rows verified in one
    call: (how often each token came first, the model's distribution at position 0)."""
    rng = np.random.default_rng(0)
    p_rows = rng.dirichlet(np.ones(vocab), size=4)             # the model at positions 0..3
    q_rows = rng.dirichlet(np.ones(vocab), size=3)             # the draft at positions 0..2
    p = np.broadcast_to(p_rows, (n, 4, vocab))
    if deterministic:
        # Prompt lookup: a fixed proposal (here token 2 first), q = one-hot.
        draft, q = np.tile(np.array([2, 0, 5]), (n, 1)), None
    else:
        draft = np.stack([rng.choice(vocab, size=n, p=q_rows[i]) for i in range(3)], axis=1)
        q = np.broadcast_to(q_rows, (n, 3, vocab))
    n_accepted, next_token = verify_sampled(p, draft, np.full(n, 3), q, np.random.default_rng(1))
    return np.bincount(first_tokens(n_accepted, next_token, draft), minlength=vocab), p_rows[0]


@pytest.mark.parametrize("deterministic", [False, True])
def test_verification_samples_the_models_distribution(deterministic):
    counts, target = first_token_counts(deterministic)
    assert chi_square(counts, target) < CHI2_CRITICAL_0001[len(target) - 1]


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_distribution_check_catches_a_wrong_acceptance_rule(monkeypatch, deterministic):
    monkeypatch.setattr(speculative, "acceptance_probability", lambda p_x, q_x: np.ones_like(p_x))
    counts, target = first_token_counts(deterministic)
    assert chi_square(counts, target) > CHI2_CRITICAL_0001[len(target) - 1]


def tiny_model(seed: int, scale: float = 0.5) -> minikv.Transformer:
    """A random one-layer llama over a vocabulary of 5 tokens."""
    config = minikv.ModelConfig(model_type="llama", vocab_size=5, hidden_size=8, n_layers=1, n_heads=2,
                                n_kv_heads=1, head_dim=4, intermediate_size=16, max_position_embeddings=32,
                                norm_eps=1e-5)
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (5, 8), "layers.0.attn_norm.weight": (8,), "layers.0.attn.q.weight": (8, 8),
              "layers.0.attn.k.weight": (4, 8), "layers.0.attn.v.weight": (4, 8), "layers.0.attn.o.weight": (8, 8),
              "layers.0.mlp_norm.weight": (8,), "layers.0.mlp.gate.weight": (16, 8),
              "layers.0.mlp.up.weight": (16, 8), "layers.0.mlp.down.weight": (8, 16),
              "final_norm.weight": (8,), "lm_head.weight": (5, 8)}
    weights = {name: scale * rng.standard_normal(shape) for name, shape in shapes.items()}
    for name in shapes:
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shapes[name])
    return minikv.Transformer(config, weights, dtype="float64")


def joint_of_first_two(model, prompt, options):
    """P(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1), from plain forwards: (vocab * vocab,)."""
    params = minikv.SamplingParams(**options)

    def next_token_distribution(tokens):
        logits = model.forward(np.array([tokens]))[:, -1]
        return minikv.sampling.distribution(logits, params, [np.array(tokens)])[0]

    first = next_token_distribution(prompt)
    seconds = np.stack([next_token_distribution(prompt + [t]) for t in range(5)])
    return (first[:, None] * seconds).reshape(-1)


def sampled_pairs(model, prompt, speculative_with, options, n=6000, seed=0):
    out = model.generate([prompt] * n, max_new_tokens=2, seed=seed, stop_tokens=[],
                         speculative=speculative_with, num_speculative_tokens=1, **options)
    pairs = np.array(out.tokens)                                          # (n, 2)
    return np.bincount(pairs[:, 0] * 5 + pairs[:, 1], minlength=25), out.stats


def chi_square_possible(counts, probs):
    """(statistic, degrees of freedom) over the cells the model can produce; impossible cells must stay empty."""
    possible = probs > 0
    assert counts[~possible].sum() == 0, "a token the filters removed was sampled"
    return chi_square(counts[possible], probs[possible]), int(possible.sum()) - 1


SAMPLING_OPTIONS = [{"temperature": 0.9}, {"temperature": 1.3, "top_k": 3},
                    {"temperature": 0.9, "repetition_penalty": 1.5}]


@pytest.mark.parametrize("options", SAMPLING_OPTIONS, ids=["T0.9", "T1.3-top_k3", "T0.9-penalty1.5"])
@pytest.mark.parametrize("proposer", ["draft", "prompt_lookup"])
def test_generate_samples_the_models_joint_distribution(proposer, options):
    """The filters and the penalty are applied alike to the model's p and the draft's q."""
    target, prompt = tiny_model(0), [1, 2, 3, 1, 2]       # prompt lookup proposes 3 (after "1 2")
    draft = tiny_model(1) if proposer == "draft" else "prompt_lookup"
    counts, stats = sampled_pairs(target, prompt, draft, options)
    assert stats.proposed_tokens == 6000                  # one proposal per row at the first step
    assert 0 < stats.accepted_tokens < stats.proposed_tokens
    statistic, dof = chi_square_possible(counts, joint_of_first_two(target, prompt, options))
    assert statistic < CHI2_CRITICAL_0001[dof]


@pytest.mark.parametrize("proposer", ["draft", "prompt_lookup"])
def test_generate_with_a_wrong_acceptance_rule_fails_the_same_check(monkeypatch, proposer):
    monkeypatch.setattr(speculative, "acceptance_probability", lambda p_x, q_x: np.ones_like(p_x))
    target, prompt = tiny_model(0), [1, 2, 3, 1, 2]
    draft = tiny_model(1) if proposer == "draft" else "prompt_lookup"
    counts, _ = sampled_pairs(target, prompt, draft, {"temperature": 0.9})
    assert chi_square(counts, joint_of_first_two(target, prompt, {"temperature": 0.9})) > CHI2_CRITICAL_0001[24]


def test_sampling_is_repeatable_by_seed():
    model = model_for("qwen2_bias")
    runs = [model.generate([[1, 2, 3], [4, 5]], max_new_tokens=12, temperature=0.8, top_k=20, seed=s,
                           speculative=draft_for("qwen2_bias"), num_speculative_tokens=3).tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


# ---------------------------------------------------------------------------------------------- rewind


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_draft_rewind_then_refeed_equals_never_having_fed(kind, data):
    """A draft that proposed k tokens, was rewound to j accepted ones and proposes again gives the same
    proposals and distributions as a fresh draft that only ever saw the accepted tokens."""
    name = data.draw(st.sampled_from(("llama_gqa", "gpt2", "qwen2_bias")), label="model")
    model, draft_model = model_for(name), draft_for(name)
    k = data.draw(st.integers(1, 6), label="k")
    lengths = data.draw(st.lists(st.integers(1, 10), min_size=1, max_size=3), label="prompt lengths")
    history = random_prompts(model, lengths, data.draw(st.integers(0, 2**16), label="seed"))
    params = minikv.SamplingParams(temperature=0.7)
    options = {"window": 40} if kind == "sliding" else {}
    used = DraftModel(draft_model)
    used.start(model, len(history), kind, 40, None, options)
    n_max = np.full(len(history), k)
    draft_tokens, _, _ = used.propose(history, n_max, params, np.random.default_rng(0))
    accepted = np.array(data.draw(st.lists(st.integers(0, k), min_size=len(history), max_size=len(history)),
                                  label="accepted"))
    extra = data.draw(st.integers(0, model.config.vocab_size - 1), label="next token")
    kept = np.array([len(h) for h in history]) + accepted               # history + accepted proposals
    used.rewind(kept)
    history = [h + draft_tokens[b, :accepted[b]].tolist() + [extra] for b, h in enumerate(history)]
    fresh = DraftModel(draft_model)
    fresh.start(model, len(history), kind, 40, None, options)
    got = used.propose(history, n_max, params, np.random.default_rng(1))
    want = fresh.propose(history, n_max, params, np.random.default_rng(1))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=EXACT)
    np.testing.assert_array_equal(used.cache.lengths, fresh.cache.lengths)


# ---------------------------------------------------------------------------------------------- bundled draft


def test_the_bundled_draft_is_a_small_float16_model_shipped_as_package_data():
    import fnmatch
    import tomllib
    from pathlib import Path

    from minikv.speculative import BUNDLED_DRAFT

    model, draft = minikv.load(), minikv.load(BUNDLED_DRAFT)
    assert BUNDLED_DRAFT.name.endswith("-draft")
    assert draft.config.vocab_size == model.config.vocab_size
    assert 100_000 < draft.n_parameters < model.n_parameters / 5
    weights = BUNDLED_DRAFT / "model.safetensors"
    assert weights.stat().st_size < 4 * 2**20
    assert "float16" in (BUNDLED_DRAFT / "config.json").read_text()
    assert "validation loss" in (BUNDLED_DRAFT / "TRAINING.md").read_text()
    root = Path(minikv.__file__).parent
    globs = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["minikv"]
    for path in BUNDLED_DRAFT.iterdir():
        assert any(fnmatch.fnmatch(str(path.relative_to(root)), g) for g in globs), path.name


def test_the_bundled_draft_gives_the_bundled_models_greedy_tokens():
    from minikv.speculative import BUNDLED_DRAFT

    model, draft = minikv.load(dtype="float64"), minikv.load(BUNDLED_DRAFT, dtype="float64")
    prompts = ["The ", "Life is "]
    plain = model.generate(prompts, max_new_tokens=24)
    out = model.generate(prompts, max_new_tokens=24, speculative=draft, num_speculative_tokens=4)
    assert out.text == plain.text
    # A trained draft agrees with the model far more often than chance (1/256 per byte).
    assert out.stats.acceptance_rate > 0.3


def test_the_readme_speculative_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(minikv.__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "speculative=" in b]
    exec(compile(block, "README speculative example", "exec"), {})
    assert "proposals accepted" in capsys.readouterr().out


def test_the_command_line_generates_the_same_greedy_text_speculatively():
    import subprocess
    import sys
    from pathlib import Path

    def run(*args):
        return subprocess.run([sys.executable, "-m", "minikv", "generate", "Life is ", "--max-new-tokens", "30",
                               "--temperature", "0", "--dtype", "float64", *args], capture_output=True, text=True,
                              timeout=300, cwd=Path(minikv.__file__).parents[1])

    plain = run()
    for proposer in ("prompt_lookup", "draft"):
        out = run("--speculative", proposer, "--num-speculative-tokens", "3")
        assert out.returncode == 0, out.stderr
        assert out.stdout == plain.stdout
        assert "proposals accepted" in out.stderr
    bad = run("--speculative", "nowhere/at/all")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nowhere/at/all" in bad.stderr


def test_the_benchmark_runs_and_writes_its_table(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "benchmarks.speculative", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=Path(minikv.__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "speculative.json").read_text())
    assert {(r["text"], r["proposer"]) for r in report["rows"]} >= {("bundled", "draft"), ("repetitive", "prompt_lookup")}
    assert "machine was shared" in (tmp_path / "speculative.md").read_text()
