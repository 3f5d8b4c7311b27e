"""Properties of minikv.sampling: each filter keeps exactly the set its definition names,
sampling draws from the distribution it claims, and randomness comes only from the rng.

Brute-force references are written here independently of the module (plain sorting and
np.exp), in float64. Tolerances: 1e-12 on float64 probability sums; examples whose answer
depends on a float64 rounding at a threshold (a cumulative mass or a ratio within 1e-9 of the
cut-off) are skipped with `assume`, since there "the right answer" is decided by rounding.
"""


import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minikv.errors import InvalidInputError, MinikvError, SamplingError
from minikv.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    kept_mass,
    min_p_filter,
    sample,
    softmax,
    top_k_filter,
    top_p_filter,
)

FAST = settings(max_examples=40, deadline=None)
NEG_INF = -np.inf


@st.composite
def logits_arrays(draw, dtype=np.float64, max_batch=3, max_vocab=24, allow_neg_inf=False):
    """(batch, vocab) logits in [-20, 20]; optionally some -inf entries (never a whole row)."""
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(1, max_vocab))
    width = 32 if dtype == np.float32 else 64
    finite = st.floats(-20, 20, width=width, allow_subnormal=False)
    elements = st.one_of(finite, st.just(NEG_INF)) if allow_neg_inf else finite
    z = draw(hnp.arrays(dtype, (batch, vocab), elements=elements))
    for row in z:
        if not np.isfinite(row).any():
            row[draw(st.integers(0, vocab - 1))] = draw(finite)
    return z


def reference_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    w = np.exp(z - z.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- parameters


INVALID_PARAMS = [
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "0.7"),
    ("top_k", 0),
    ("top_k", -3),
    ("top_k", 2.5),
    ("top_k", 3.0),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", float("nan")),
    ("min_p", -0.1),
    ("min_p", 1.01),
    ("min_p", float("nan")),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.2),
    ("repetition_penalty", float("inf")),
    ("repetition_penalty", float("nan")),
]


@pytest.mark.parametrize("name,value", INVALID_PARAMS)
def test_invalid_parameter_raises_sampling_error_naming_it(name, value):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{name: value})
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, MinikvError)
    message = str(error)
    assert name in message
    assert repr(value) in message


@pytest.mark.parametrize(
    "call",
    [
        lambda z: top_k_filter(z, 0),
        lambda z: top_p_filter(z, 0.0),
        lambda z: min_p_filter(z, 2.0),
        lambda z: apply_temperature(z, -1.0),
        lambda z: apply_temperature(z, 0.0),  # greedy is sample's job, not a division by 0
        lambda z: apply_repetition_penalty(z, [[0]], 0.0),
    ],
)
def test_filters_validate_their_parameter(call):
    with pytest.raises(SamplingError):
        call(np.zeros((1, 4)))


def test_valid_params_normalise_and_greedy_flag():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), top_p=1, min_p=0)
    assert params == SamplingParams(temperature=0.5, top_k=5, top_p=1.0, min_p=0.0)
    assert type(params.top_k) is int and type(params.temperature) is float
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().is_greedy
    with pytest.raises(AttributeError):  # frozen
        params.temperature = 2.0


@pytest.mark.parametrize(
    "bad_logits",
    [np.zeros(5), np.zeros((1, 2, 3)), np.zeros((2, 3), dtype=np.int64),
     np.array([[0.0, np.nan]]), np.array([[0.0, np.inf]]), np.full((1, 3), NEG_INF)],
)
def test_bad_logits_raise_invalid_input(bad_logits):
    with pytest.raises(InvalidInputError):
        sample(bad_logits, SamplingParams(), np.random.default_rng(0))


def test_bad_rng_and_previous_tokens_raise():
    z = np.zeros((2, 5))
    with pytest.raises(InvalidInputError):
        sample(z, SamplingParams(), rng=0)
    with pytest.raises(InvalidInputError, match="2 rows"):
        apply_repetition_penalty(z, [[1]], 1.5)
    with pytest.raises(InvalidInputError, match=r"\[0, 5\)"):
        apply_repetition_penalty(z, [[1], [5]], 1.5)


# ---------------------------------------------------------------- purity and dtypes


FILTERS = {
    "temperature": lambda z: apply_temperature(z, 0.7),
    "top_k": lambda z: top_k_filter(z, 3),
    "top_p": lambda z: top_p_filter(z, 0.8),
    "min_p": lambda z: min_p_filter(z, 0.1),
    "repetition": lambda z: apply_repetition_penalty(z, [[0]] * len(z), 1.3),
    "softmax": softmax,
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(FILTERS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_filters_preserve_dtype_and_never_modify_input(dtype, name, data):
    z = data.draw(logits_arrays(dtype=dtype, allow_neg_inf=True))
    before = z.copy()
    out = FILTERS[name](z)
    assert out.dtype == dtype
    assert out.shape == z.shape
    assert out is not z and not np.shares_memory(out, z)
    np.testing.assert_array_equal(z, before)


# ---------------------------------------------------------------- softmax and temperature


@FAST
@given(z=logits_arrays(allow_neg_inf=True))
def test_softmax_matches_reference_and_sums_to_one(z):
    p = softmax(z)
    np.testing.assert_allclose(p, reference_softmax(z), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-12)
    assert (p[np.isneginf(z)] == 0).all()


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([[1000.0, 999.0], [-1000.0, -1001.0]], dtype=np.float32))
    assert p.dtype == np.float32 and np.isfinite(p).all()
    np.testing.assert_allclose(p[0], p[1], rtol=1e-6)


@FAST
@given(z=logits_arrays(), t=st.floats(0.05, 20))
def test_temperature_scales_the_distribution_like_z_over_t(z, t):
    np.testing.assert_allclose(softmax(apply_temperature(z, t)), reference_softmax(z / t),
                               rtol=1e-10, atol=1e-14)


def test_extreme_temperatures_give_the_limits_not_nan():
    z = np.array([[1.0, 3.0, 2.0, NEG_INF]], dtype=np.float32)
    cold = softmax(apply_temperature(z, 1e-300))  # T -> 0: one-hot on the argmax
    np.testing.assert_array_equal(cold, [[0, 1, 0, 0]])
    hot = softmax(apply_temperature(z, 1e300))  # T -> inf: uniform over the finite tokens
    np.testing.assert_allclose(hot, [[1 / 3, 1 / 3, 1 / 3, 0]], rtol=1e-6)


# ---------------------------------------------------------------- top-k


@FAST
@given(z=logits_arrays(), k=st.integers(1, 30))
def test_top_k_keeps_exactly_the_k_largest(z, k):
    kept = np.isfinite(top_k_filter(z, k))
    n_keep = min(k, z.shape[1])
    assert (kept.sum(axis=-1) == n_keep).all()
    for row, keep in zip(z, kept):
        if n_keep < len(row):
            assert row[keep].min() >= row[~keep].max()  # nothing removed beats anything kept
    np.testing.assert_array_equal(top_k_filter(z, k)[kept], z[kept])


def test_top_k_ties_keep_exactly_k_lowest_ids():
    z = np.array([[1.0, 5.0, 5.0, 5.0, 5.0, 0.0]])
    np.testing.assert_array_equal(np.isfinite(top_k_filter(z, 2)), [[0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(top_k_filter(np.zeros((1, 5)), 3)), [[1, 1, 1, 0, 0]])


@settings(max_examples=20, deadline=None)
@given(z=logits_arrays(max_batch=1, max_vocab=20), k=st.integers(1, 6), seed=st.integers(0, 2**32))
def test_top_k_never_samples_outside_the_k_largest(z, k, seed):
    # 2000 draws in one call: the row repeated 2000 times. With a flatter temperature the
    # removed tokens would be likely, so a leak would show.
    rows = np.repeat(z, 2000, axis=0)
    tokens = sample(rows, SamplingParams(temperature=5.0, top_k=k), np.random.default_rng(seed))
    allowed = np.flatnonzero(np.isfinite(top_k_filter(z, k))[0])
    assert np.isin(tokens, allowed).all()


def test_top_k_ranks_unscaled_logits_so_rounding_cannot_swap_a_near_tie():
    # (9e-61 - 1) / 5 rounds to (0 - 1) / 5: ranking after the temperature would see a tie and
    # keep token 1; the model's logits say token 2 (9e-61 > 0) is the second largest.
    z = np.tile([1.0, 0.0, 9.09e-61], (2000, 1))
    tokens = sample(z, SamplingParams(temperature=5.0, top_k=2), np.random.default_rng(0))
    assert set(np.unique(tokens)) == {0, 2}


def test_top_k_one_equals_greedy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, 40))
    z[:, 7] = z.max(axis=-1)  # ties with the max: both rules must pick the lower id
    greedy = sample(z, SamplingParams(temperature=0.0), None)
    np.testing.assert_array_equal(sample(z, SamplingParams(top_k=1), rng), greedy)


# ---------------------------------------------------------------- top-p


def brute_force_nucleus_size(probs, p):
    """Smallest n such that the n most likely tokens have mass >= p, and the cumulative sums."""
    cumulative = np.cumsum(np.sort(probs)[::-1])
    return int(np.argmax(cumulative >= p)) + 1, cumulative


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@settings(max_examples=80, deadline=None)
@given(data=st.data(), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(dtype, tol, data, p):
    z = data.draw(logits_arrays(dtype=dtype, allow_neg_inf=True))
    out = top_p_filter(z, p)
    assert out.dtype == dtype
    kept_logits = np.isfinite(out)
    np.testing.assert_array_equal(out[kept_logits], z[kept_logits])  # kept: untouched
    probs = reference_softmax(z)  # the float32 logits, read exactly in float64
    for row_probs, keep, finite in zip(probs, np.isfinite(out), np.isfinite(z)):
        mass = row_probs[keep].sum()
        assert keep.any()
        assert mass >= p - tol  # enough mass
        # minimal: the least likely kept token is the one that crossed p
        assert mass - row_probs[keep].min() < p + tol
        # the highest-probability tokens: nothing removed is more likely than anything kept
        if (~keep).any():
            assert row_probs[keep].min() >= row_probs[~keep].max()
        # and the exact size a brute-force sort gives, away from rounding at the threshold
        size, cumulative = brute_force_nucleus_size(row_probs, p)
        if p < 1.0:
            assume(np.abs(cumulative - p).min() > 1e-9)
            assert keep.sum() == size
        else:
            np.testing.assert_array_equal(keep, finite)  # p == 1: every possible token


def test_top_p_worked_example_and_ties():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    z = np.log(probs)[None, :]
    np.testing.assert_array_equal(np.isfinite(top_p_filter(z, 0.5)), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(z, 0.75)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(z, 0.9)), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(z, 0.01)), [[1, 0, 0, 0]])
    # four equal tokens, p = 0.6: three are needed (0.75 >= 0.6), the lowest ids win the tie
    np.testing.assert_array_equal(np.isfinite(top_p_filter(np.zeros((1, 4)), 0.6)), [[1, 1, 1, 0]])


# ---------------------------------------------------------------- min-p


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@FAST
@given(data=st.data(), min_p=st.floats(0.0, 1.0))
def test_min_p_keeps_exactly_tokens_above_the_scaled_max(dtype, data, min_p):
    z = data.draw(logits_arrays(dtype=dtype, allow_neg_inf=True))
    kept = np.isfinite(min_p_filter(z, min_p))
    probs = reference_softmax(z)
    ratio = probs / probs.max(axis=-1, keepdims=True)
    assume(np.abs(ratio - min_p).min() > 1e-9)  # not decided by rounding
    np.testing.assert_array_equal(kept, probs >= min_p * probs.max(axis=-1, keepdims=True))


def test_min_p_worked_example():
    z = np.log(np.array([[0.6, 0.25, 0.1, 0.05]]))
    # threshold 0.2 * 0.6 = 0.12: keeps 0.6 and 0.25 only
    np.testing.assert_array_equal(np.isfinite(min_p_filter(z, 0.2)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(min_p_filter(z, 0.0)), [[1, 1, 1, 1]])
    np.testing.assert_array_equal(np.isfinite(min_p_filter(z, 1.0)), [[1, 0, 0, 0]])


# ---------------------------------------------------------------- repetition penalty


@FAST
@given(
    z=logits_arrays(max_batch=1, max_vocab=20),
    penalty=st.floats(1.01, 10.0),
    data=st.data(),
)
def test_repetition_penalty_lowers_seen_tokens_and_leaves_unseen_alone(z, penalty, data):
    vocab = z.shape[1]
    seen = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=10)))
    out = apply_repetition_penalty(z, [seen], penalty)
    is_seen = np.zeros(vocab, dtype=bool)
    is_seen[seen] = True
    row, new = z[0], out[0]
    # unseen: bit for bit unchanged
    np.testing.assert_array_equal(new[~is_seen], row[~is_seen])
    # seen: exactly the CTRL rule (positive / penalty, negative * penalty) ...
    np.testing.assert_array_equal(
        new[is_seen], np.where(row[is_seen] > 0, row[is_seen] / penalty, row[is_seen] * penalty))
    # ... so every nonzero seen logit went strictly down
    moved = is_seen & (row != 0)
    assert (new[moved] < row[moved]).all()
    # and the seen tokens together lose probability (when some token is unseen)
    if (~is_seen).any():
        before, after = reference_softmax(row)[is_seen].sum(), reference_softmax(new)[is_seen].sum()
        assert after <= before + 1e-12
        # Strictly less when the loss is big enough to show in float64. To first order the seen tokens
        # lose sum_i p_i * shift_i (moved tokens) times the unseen mass; z = [0, -19, -19] with {0, 1}
        # seen loses ~e^-38, below rounding, although a logit moved by 19.
        p = reference_softmax(row)
        first_order = (p[moved] * np.minimum(np.abs(new - row)[moved], 1.0)).sum() * p[~is_seen].sum()
        if first_order > 1e-12:
            assert after < before


def test_repetition_penalty_single_seen_token_loses_probability_and_quirks():
    z = np.array([[2.0, -1.0, 0.0, 0.5]])
    for token in (0, 1, 3):
        out = apply_repetition_penalty(z, [[token]], 1.5)
        assert softmax(out)[0, token] < softmax(z)[0, token]
    # duplicates penalise once; a logit of exactly 0 is untouched (the rule's known quirk)
    np.testing.assert_array_equal(apply_repetition_penalty(z, [[0, 0, 0, 2]], 2.0), [[1.0, -1.0, 0.0, 0.5]])
    # penalty < 1 rewards repeats; penalty 1 and previous_tokens=None change nothing
    assert apply_repetition_penalty(z, [[0]], 0.5)[0, 0] == 4.0
    np.testing.assert_array_equal(apply_repetition_penalty(z, [[0, 1]], 1.0), z)
    np.testing.assert_array_equal(apply_repetition_penalty(z, None, 2.0), z)


def test_sample_applies_repetition_penalty_before_greedy():
    z = np.array([[3.0, 2.9, 0.0]])
    greedy_penalised = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert sample(z, greedy_penalised, None, previous_tokens=[np.array([0])])[0] == 1
    assert sample(z, greedy_penalised, None)[0] == 0  # no history: no penalty


# ---------------------------------------------------------------- greedy and temperature -> 0


@FAST
@given(z=logits_arrays(allow_neg_inf=True))
def test_temperature_zero_is_argmax_with_ties_to_lowest_id(z):
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    tokens = sample(z, SamplingParams(temperature=0.0, top_k=2, top_p=0.3), rng)
    assert tokens.dtype == np.int64 and tokens.shape == (z.shape[0],)
    expected = [int(np.flatnonzero(row == row.max())[0]) for row in z]
    np.testing.assert_array_equal(tokens, expected)
    assert rng.bit_generator.state == state  # greedy draws no random numbers


@FAST
@given(
    z=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 20)),
                 elements=st.floats(-10, 10), unique=True),
    seed=st.integers(0, 2**32),
)
def test_temperature_near_zero_equals_greedy(z, seed):
    # distinct logits, gap g >= 1e-4: at T = 1e-6 the runner-up has probability <= exp(-g/T)
    # = exp(-100) relative to the top, so any other token being drawn would be a bug.
    for row in z:
        top_two = np.sort(row)[-2:]
        assume(top_two[1] - top_two[0] >= 1e-4)
    tokens = sample(z, SamplingParams(temperature=1e-6), np.random.default_rng(seed))
    np.testing.assert_array_equal(tokens, z.argmax(axis=-1))


# ---------------------------------------------------------------- randomness


def test_same_seed_same_tokens_different_seed_different_tokens():
    flat = np.zeros((50, 1000), dtype=np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a = sample(flat, params, np.random.default_rng(1234))
    b = sample(flat, params, np.random.default_rng(1234))
    c = sample(flat, params, np.random.default_rng(1235))
    np.testing.assert_array_equal(a, b)
    # 50 draws from ~950 equally likely tokens: equal by chance with probability ~950**-50
    assert (a != c).any()
    assert len(np.unique(a)) > 30  # and they spread over the vocabulary


def test_empirical_distribution_matches_softmax():
    # 20000 draws from an 8-token distribution, one rng.random call. Pearson's chi-square with
    # 7 degrees of freedom exceeds 24.32 with probability 0.001 for a correct sampler; the seed
    # is fixed, so this is deterministic. An off-by-one in the inverse CDF would give ~1e4.
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    rows = np.tile(logits, (20000, 1))
    tokens = sample(rows, SamplingParams(), np.random.default_rng(20240601))
    counts = np.bincount(tokens, minlength=8)
    assert chi_square(counts, reference_softmax(logits)) < 24.32


def test_empirical_distribution_with_filters_matches_renormalised_survivors():
    # temperature 0.5, top_k=5 then top_p=0.9: the draw must follow softmax(z / T) restricted to
    # the survivors and renormalised. Same chi-square bound, df = survivors - 1.
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5], dtype=np.float32)
    params = SamplingParams(temperature=0.5, top_k=5, top_p=0.9)
    q = reference_softmax(logits / np.float32(0.5))
    top5 = np.argsort(-q, kind="stable")[:5]
    q5 = q[top5] / q[top5].sum()
    n = int(np.argmax(np.cumsum(q5) >= 0.9)) + 1
    survivors = top5[:n]
    expected = q[survivors] / q[survivors].sum()
    tokens = sample(np.tile(logits, (20000, 1)), params, np.random.default_rng(7))
    assert np.isin(tokens, survivors).all()
    counts = np.array([(tokens == s).sum() for s in survivors])
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[len(survivors) - 1]  # chi2 0.999 quantiles
    assert chi_square(counts, expected) < critical


# ---------------------------------------------------------------- combinations, kept mass


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-3, 0.3, 1.0, 3.0]),
    top_k=st.none() | st.integers(1, 30),
    top_p=st.none() | st.floats(0.001, 1.0),
    min_p=st.none() | st.floats(0.0, 1.0),
    repetition_penalty=st.floats(0.5, 3.0),
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), params=params_strategy, seed=st.integers(0, 2**32))
def test_any_combination_samples_a_possible_token(dtype, data, params, seed):
    z = data.draw(logits_arrays(dtype=dtype, allow_neg_inf=True))
    history = [np.array(data.draw(st.lists(st.integers(0, z.shape[1] - 1), max_size=5)),
                        dtype=np.int64) for _ in range(z.shape[0])]
    before = z.copy()
    tokens = sample(z, params, np.random.default_rng(seed), previous_tokens=history)
    assert tokens.dtype == np.int64 and tokens.shape == (z.shape[0],)
    assert np.isfinite(z[np.arange(len(z)), tokens]).all()  # never a masked (-inf) token
    np.testing.assert_array_equal(z, before)
    mass = kept_mass(z, params, previous_tokens=history)
    assert mass.dtype == dtype
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()  # support never empty
    # every filter alone, chained by hand, also leaves a finite token in each row
    chained = z
    if not params.is_greedy:
        chained = apply_temperature(chained, params.temperature)
    for filt, value in ((top_k_filter, params.top_k), (top_p_filter, params.top_p),
                        (min_p_filter, params.min_p)):
        if value is not None:
            chained = filt(chained, value)
            assert chained.dtype == dtype and np.isfinite(chained).any(axis=-1).all()


@FAST
@given(z=logits_arrays(), t=st.floats(0.1, 5.0), p=st.floats(0.01, 1.0), k=st.integers(1, 30))
def test_kept_mass_is_the_base_probability_of_the_kept_tokens(z, t, p, k):
    base = reference_softmax(z / t)
    assert np.allclose(kept_mass(z, SamplingParams(temperature=t)), 1.0, atol=1e-12)
    # top-p alone keeps at least p of the temperature-scaled mass
    assert (kept_mass(z, SamplingParams(temperature=t, top_p=p)) >= p - 1e-9).all()
    # top-k alone keeps the k largest probabilities
    top_k_mass = np.sort(base, axis=-1)[:, ::-1][:, :k].sum(axis=-1)
    np.testing.assert_allclose(kept_mass(z, SamplingParams(temperature=t, top_k=k)), top_k_mass,
                               rtol=1e-9)
    # adding a filter can only shrink the kept mass
    both = kept_mass(z, SamplingParams(temperature=t, top_k=k, top_p=p))
    assert (both <= top_k_mass + 1e-9).all()
    assert (kept_mass(z, SamplingParams(temperature=0.0)) == 1.0).all()
