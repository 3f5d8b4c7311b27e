"""Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The model hands us one row of logits ``z`` per sequence, shape ``(batch, vocab)``. A
distribution over the vocabulary is ``p = softmax(z)``, ``p_i = exp(z_i) / sum_j exp(z_j)``.
Every knob below reshapes that distribution before we draw from it:

* **repetition penalty** ``r`` (CTRL, Keskar et al. 2019; Hugging Face's rule): for each token
  already in the sequence, ``z_i -> z_i / r`` if ``z_i > 0`` else ``z_i * r``. With ``r > 1``
  a seen token's logit always moves down (towards -inf), whatever its sign.
* **temperature** ``T``: ``p_i(T) = softmax(z / T)_i``. ``T < 1`` sharpens, ``T > 1`` flattens,
  ``T -> 0`` puts all the mass on the argmax, so ``T == 0`` *means* greedy.
* **top-k** ``k``: keep the ``k`` largest logits. Kept mass: the sum of the ``k`` largest ``p_i``.
* **top-p** (nucleus, Holtzman et al. 2019) ``p``: sort descending and keep the *smallest*
  prefix whose mass reaches ``p``: ``sum_{i < n} p_(i) >= p`` with ``n`` minimal. Kept mass
  is in ``[p, p + p_(n-1))``: the last kept token is the one that pushed the total over ``p``.
* **min-p** ``m`` (Nguyen et al. 2024): keep token ``i`` iff ``p_i >= m * max_j p_j``. The
  cut-off scales with the model's confidence: a peaked row keeps few tokens, a flat row many.

A removed token gets the logit ``-inf`` (probability exactly 0 after softmax); the filters
are pure functions that return a new array of the input's dtype and never touch the input.
Every filter keeps the most likely token, so no row is ever left with nothing to sample.

All randomness comes from the ``numpy.random.Generator`` you pass in: the same seed gives the
same tokens, run after run.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from minikv.errors import InvalidInputError, SamplingError
from minikv.validate import rng as check_rng

__all__ = ["SamplingParams", "sample", "kept_mass", "distribution", "draw", "softmax", "apply_repetition_penalty", "apply_temperature",
           "top_k_filter", "top_p_filter", "min_p_filter"]


# ----------------------------------------------------------------------------------------
# The checks, one per parameter, in one table. Public functions check at the door; the
# pipeline inside (``sample``) runs on checked values and never re-checks.
# ----------------------------------------------------------------------------------------


def _real(v) -> bool:
    # bool is an int in Python, but `temperature=True` is a bug, not a temperature.
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# name -> (is the value allowed?, what is allowed, the type it is normalised to)
_RULES = {
    "temperature": (lambda v: _real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0 (0 means greedy)", float),
    "top_k": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1,
              "an integer >= 1 (or None to disable it)", int),
    "top_p": (lambda v: _real(v) and 0.0 < v <= 1.0, "a number in (0, 1] (or None to disable it)", float),
    "min_p": (lambda v: _real(v) and 0.0 <= v <= 1.0, "a number in [0, 1] (or None to disable it)", float),
    "repetition_penalty": (lambda v: _real(v) and math.isfinite(v) and v > 0,
                           "a finite number > 0 (1.0 disables it, > 1 discourages repeats)", float),
}


def _check_param(name: str, value):
    """The one check of a sampling parameter: its value as a plain Python number, or SamplingError."""
    allowed, what, cast = _RULES[name]
    if not allowed(value):                      # comparisons with NaN are False: NaN is refused too
        raise SamplingError(f"{name} must be {what}; got {value!r}")
    return cast(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults sample from the model's plain distribution.

    temperature:        ``>= 0``; ``0.0`` means greedy (argmax, ties to the lowest token id).
    top_k:              ``None`` or an int ``>= 1``: keep the k most likely tokens.
    top_p:              ``None`` or a number in ``(0, 1]``: keep the smallest set with mass >= top_p.
    min_p:              ``None`` or a number in ``[0, 1]``: keep tokens with p >= min_p * p_max.
    repetition_penalty: ``> 0``; ``1.0`` is off, ``> 1`` discourages tokens already in the sequence.

    An impossible value raises ``SamplingError`` (a ``ValueError``) naming it and the allowed range.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # Normalise to plain Python numbers (np.float32(0.7) -> 0.7) so equal settings compare
        # and hash equal; object.__setattr__ because the dataclass is frozen.
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None or field.name in ("temperature", "repetition_penalty"):
                object.__setattr__(self, field.name, _check_param(field.name, value))

    @property
    def is_greedy(self) -> bool:
        """True when ``temperature == 0``: ``sample`` returns the argmax and draws no random numbers.
        (``top_k=1`` picks the same tokens, but goes through the sampling path.)"""
        return self.temperature == 0.0


def _check_logits(logits, previous_tokens=None) -> np.ndarray:
    """Logits must be a 2-D floating array with no NaN and no +inf (-inf means 'removed'), and at
    least one finite entry per row; previous_tokens one 1-D int array of ids per row, or None."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.dtype.kind != "f" or logits.shape[1] == 0:
        raise InvalidInputError(
            f"logits must be a floating-point array of shape (batch, vocab >= 1); got shape {logits.shape} and dtype "
            f"{logits.dtype} (for one sequence pass logits[None, :]; for model.forward output logits[:, -1, :])")
    # One comparison finds both: NaN < inf and inf < inf are False, -inf < inf is True.
    if not (logits < np.inf).all():
        raise InvalidInputError("logits contain NaN or +inf; a model that produces them has overflowed "
                                "(try dtype='float64', or check the checkpoint)")
    empty_rows = np.flatnonzero(~(logits > -np.inf).any(axis=-1))
    if empty_rows.size:
        raise InvalidInputError(f"rows {empty_rows.tolist()} of logits are all -inf: there is no token to sample "
                                "(every token was masked before sampling)")
    if previous_tokens is not None:
        batch, vocab = logits.shape
        if len(previous_tokens) != batch:
            raise InvalidInputError(f"previous_tokens has {len(previous_tokens)} entries but logits has {batch} rows; "
                                    "pass one 1-D array of token ids (prompt + generated so far) per row")
        for b, tokens in enumerate(previous_tokens):
            tokens = np.asarray(tokens)
            if tokens.size and (tokens.ndim != 1 or tokens.dtype.kind not in "iu"
                                or tokens.min() < 0 or tokens.max() >= vocab):
                raise InvalidInputError(f"previous_tokens[{b}] must be a 1-D array of integer token ids in "
                                        f"[0, {vocab}); got {tokens.tolist()!r:.80}")
    return logits


# ----------------------------------------------------------------------------------------
# softmax and the filters: pure functions of checked arrays (the public names below check first)
# ----------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    # softmax(z) = softmax(z - c) for any per-row constant c. With c = max_j z_j the largest
    # exponent is exp(0) = 1: nothing overflows, and the denominator is >= 1.
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def _penalise(logits, previous_tokens, penalty: float) -> np.ndarray:
    out = logits.copy()
    penalty_in_dtype = logits.dtype.type(penalty)  # a float64 scalar would promote float32
    for b, tokens in enumerate(previous_tokens):
        seen = np.unique(np.asarray(tokens, dtype=np.int64))  # a token seen 5 times is penalised once
        z = out[b, seen]
        with np.errstate(over="ignore", divide="ignore"):
            # z > 0: z / r;  z <= 0: z * r.  With r > 1 both move z down, so a seen token never
            # gains probability relative to unseen ones (dividing a negative logit by r would
            # have *raised* it). Quirk of this rule: a logit of exactly 0 is left unchanged.
            out[b, seen] = np.where(z > 0, z / penalty_in_dtype, z * penalty_in_dtype)
    # A tiny penalty (r << 1) can push a boosted logit past the dtype's range; saturate at the
    # largest finite value instead of +inf, which softmax cannot handle.
    np.minimum(out, np.finfo(out.dtype).max, out=out)
    return out


def _temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    # softmax(z / T) = softmax((z - max z) / T): we subtract the row max *before* dividing so
    # that a tiny T sends the other tokens to -inf (their limit as T -> 0) instead of sending
    # the top token to +inf (which softmax cannot handle). The max entry becomes exactly 0.
    shifted = logits - logits.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scaled = shifted / logits.dtype.type(temperature)
    # Edge cases of the division in a narrow dtype: T underflowing to 0 (0 / 0 = NaN at the max)
    # and T overflowing to inf (-inf / inf = NaN at removed tokens).
    scaled[shifted == 0] = 0
    scaled[np.isneginf(shifted)] = -np.inf
    return scaled


def _keep_k_largest(values: np.ndarray, kth_largest: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Mask keeping exactly k[b] entries of row b: all above its k-th largest value, then
    entries equal to it, lowest ids first, until k are kept.

    kth_largest and k have shape (batch, 1). Ties at the cut-off go to the lowest token ids, the
    same rule as greedy's argmax, so the answer is deterministic. O(vocab) per row once the k-th
    largest value is known (np.partition finds it without sorting a 150k vocabulary).
    """
    above = values > kth_largest
    at_cutoff = values == kth_largest
    free_slots = k - above.sum(axis=-1, keepdims=True)
    return above | (at_cutoff & (np.cumsum(at_cutoff, axis=-1) <= free_slots))


def _remove(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep, logits, logits.dtype.type(-np.inf))


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    vocab = logits.shape[-1]
    if k >= vocab:
        return logits.copy()
    # The k-th largest is at index vocab - k once the row is partitioned in ascending order.
    kth_largest = np.partition(logits, vocab - k, axis=-1)[:, vocab - k: vocab - k + 1]
    return _remove(logits, _keep_k_largest(logits, kth_largest, np.full((logits.shape[0], 1), k)))


def _top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    if top_p == 1.0:
        # All the mass is the whole vocabulary. Special-cased because a float cumulative sum
        # can reach 1.0 a few tokens early and would drop tiny-but-possible tokens.
        return logits.copy()
    # Decide in float64 so that the cumulative sum over a 100k vocabulary is accurate; only the
    # kept/removed decision leaves this function, the logits keep their dtype.
    probs = _softmax(logits.astype(np.float64))
    # Only tokens with a finite logit can be in the nucleus (after top-k, k of a 150k vocabulary):
    # np.partition brings the n largest to the front in O(vocab), and only those are sorted.
    n = int((logits > -np.inf).sum(axis=-1).max())
    sorted_probs = -np.sort(np.partition(-probs, n - 1, axis=-1)[:, :n], axis=-1)  # p_(0) >= p_(1) >= ...
    # mass_before[n] = p_(0) + ... + p_(n-1): the mass of the tokens ranked above rank n.
    # Keep rank n while the tokens above it do not yet reach top_p. That keeps ranks 0..N-1
    # with N the smallest count whose mass reaches top_p: the token that crosses the line is
    # kept, everything after it is not. Rank 0 has mass_before 0 < top_p, so N >= 1.
    cumulative = np.cumsum(sorted_probs, axis=-1)
    mass_before = np.concatenate([np.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    n_keep = (mass_before < top_p).sum(axis=-1, keepdims=True)  # a prefix: mass_before rises
    # Keeping the N most likely tokens is top-k with k = N (per row), ties to the lowest ids.
    kth_largest = np.take_along_axis(sorted_probs, n_keep - 1, axis=-1)
    return _remove(logits, _keep_k_largest(probs, kth_largest, n_keep))


def _min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    # p_i >= min_p * p_max  <=>  p_i / p_max >= min_p  <=>  exp(z_i - z_max) >= min_p.
    # The softmax denominator cancels in the ratio, so we never need to normalise.
    z = logits.astype(np.float64)
    return _remove(logits, np.exp(z - z.max(axis=-1, keepdims=True)) >= min_p)  # the top token: ratio 1


def softmax(logits) -> np.ndarray:
    """Row-wise ``p_i = exp(z_i - max z) / sum_j exp(z_j - max z)``, in the logits' dtype.
    ``-inf`` logits get probability exactly 0; a row that is all ``-inf`` raises ``InvalidInputError``."""
    return _softmax(_check_logits(logits))


def apply_repetition_penalty(logits, previous_tokens, penalty: float) -> np.ndarray:
    """Penalise tokens already in each sequence (CTRL / Hugging Face rule).

    For every token id ``i`` in ``previous_tokens[b]`` (duplicates count once):
    ``z[b, i] -> z[b, i] / penalty`` if ``z[b, i] > 0`` else ``z[b, i] * penalty``.
    Unseen tokens' logits are returned unchanged (bit for bit). ``previous_tokens`` is a list of
    ``batch`` 1-D int arrays (prompt + generated so far), a 2-D int array, or None (no-op)."""
    penalty = _check_param("repetition_penalty", penalty)
    logits = _check_logits(logits, previous_tokens)
    return logits.copy() if previous_tokens is None else _penalise(logits, previous_tokens, penalty)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Scale logits by ``1 / T`` so that ``softmax(result) == softmax(logits / T)``.

    The result is ``(z - max z) / T``: the row maximum is subtracted first (softmax ignores a
    per-row constant), so the top token's logit is 0 and the others are <= 0. ``T`` must be
    > 0; temperature 0 is greedy decoding, which ``sample`` handles with an argmax."""
    if _check_param("temperature", temperature) == 0.0:
        raise SamplingError("apply_temperature needs temperature > 0; got 0.0 (temperature 0 means greedy: "
                            "use sample(..., SamplingParams(temperature=0.0), ...) or logits.argmax(axis=-1))")
    return _temperature(_check_logits(logits), float(temperature))


def top_k_filter(logits, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits of each row; the rest become ``-inf``.
    Kept mass: the sum of the ``k`` largest ``p_i``. Exactly ``k`` tokens are kept even when several
    logits tie at the cut-off: the tie goes to the lowest token ids (deterministic)."""
    return _top_k(_check_logits(logits), _check_param("top_k", k))


def top_p_filter(logits, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass is >= ``p``.

    With tokens sorted so that ``p_(0) >= p_(1) >= ...``, keep ``0..N-1`` for the smallest ``N``
    with ``p_(0) + ... + p_(N-1) >= p``. Kept mass is at least ``p`` and less than ``p`` plus
    the last kept token's probability; dropping that token would fall below ``p``. When tokens
    tie at the boundary the lowest ids are kept (the set is still of minimal size). The top
    token is always kept; ``p == 1`` keeps everything."""
    return _top_p(_check_logits(logits), _check_param("top_p", p))


def min_p_filter(logits, p: float) -> np.ndarray:
    """Keep tokens with ``p_i >= p * max_j p_j`` (equivalently ``z_i >= max z + log p``).
    A confident row (one large ``p_max``) keeps few tokens, a flat row many. The top token is
    always kept; ``p == 0`` keeps everything."""
    return _min_p(_check_logits(logits), _check_param("min_p", p))


# ----------------------------------------------------------------------------------------
# sample: the whole pipeline
# ----------------------------------------------------------------------------------------


def _filter(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """top-k, temperature, top-p, min-p: the non-greedy path of ``sample`` (T > 0).

    Why this order:
    1. top-k reads only the ranking of the logits, and dividing by T > 0 does not change the
       ranking, so "temperature then top-k" and "top-k then temperature" keep the same set in
       exact arithmetic. In floats, (z - max z) / T can round two nearly equal logits to the
       same value and hand the tie to the wrong token, so we rank the unscaled logits first.
    2. Temperature before top-p and min-p, so that they measure mass in the distribution we
       will actually draw from: softmax(z / T), not softmax(z).
    3. top-p after top-k: top-p then measures mass *within the k survivors* (renormalised),
       as Hugging Face's logits warpers do. Swapping them can change the kept set.
    4. min-p last: it compares each token with the top token, p_i / p_max, and that ratio
       does not change when other tokens are removed, so its place after T does not matter.
    Each filter keeps the most likely token, so every row keeps at least one finite logit."""
    z = logits if params.top_k is None else _top_k(logits, params.top_k)
    z = _temperature(z, params.temperature)
    z = z if params.top_p is None else _top_p(z, params.top_p)
    return z if params.min_p is None else _min_p(z, params.min_p)


def _checked_pipeline_input(logits, params, previous_tokens) -> np.ndarray:
    """The door of sample and kept_mass: checked logits, with the repetition penalty applied."""
    if not isinstance(params, SamplingParams):
        raise InvalidInputError(f"params must be a minikv.sampling.SamplingParams; got {type(params).__name__} "
                                "(e.g. SamplingParams(temperature=0.8, top_p=0.95))")
    penalise = previous_tokens is not None and params.repetition_penalty != 1.0
    logits = _check_logits(logits, previous_tokens if penalise else None)
    return _penalise(logits, previous_tokens, params.repetition_penalty) if penalise else logits


def sample(logits, params: SamplingParams, rng, previous_tokens=None) -> np.ndarray:
    """Pick one token id per row of ``logits`` (batch, vocab); returns int64 (batch,).

    1. repetition penalty on the raw logits (needs ``previous_tokens``: a list of ``batch``
       1-D int arrays, prompt + generated so far; ignored when None). It rescales logits, so
       it comes before anything that reads probabilities.
    2. ``temperature == 0``: greedy. Return the argmax (ties to the lowest id). The filters
       never remove the top token, so they could not change the answer; no random numbers
       are drawn and ``rng`` may be None.
    3. top-k, temperature, top-p, min-p (see ``_filter`` for why in this order).
    4. draw by inverse CDF: ``u ~ Uniform[0, 1)`` from ``rng.random(batch)``; return the first
       token ``i`` whose cumulative probability ``P_i = p_0 + ... + p_i`` exceeds ``u``. Token
       ``i`` owns the interval ``[P_{i-1}, P_i)`` of length ``p_i``, so it is drawn with
       probability ``p_i``; removed tokens own empty intervals and are never drawn.
    """
    logits = _checked_pipeline_input(logits, params, previous_tokens)
    if params.is_greedy:
        return logits.argmax(axis=-1).astype(np.int64)  # argmax returns the first (lowest id) max
    check_rng(rng)
    return draw(_softmax(_filter(logits, params).astype(np.float64)), rng)


def distribution(logits, params: SamplingParams, previous_tokens=None) -> np.ndarray:
    """The float64 distribution ``sample`` draws from, per row of ``logits`` (batch, vocab).

    Steps 1 and 3 of ``sample`` (penalty, then the filters and temperature), then softmax; for
    ``temperature == 0`` a one-hot row at the argmax. Speculative decoding needs these numbers
    themselves (the acceptance rule compares the model's and the draft's probabilities)."""
    logits = _checked_pipeline_input(logits, params, previous_tokens)
    if params.is_greedy:
        probs = np.zeros(logits.shape, dtype=np.float64)
        probs[np.arange(logits.shape[0]), logits.argmax(axis=-1)] = 1.0
        return probs
    return _softmax(_filter(logits, params).astype(np.float64))


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of ``probs`` (batch, vocab), by inverse CDF (step 4 of ``sample``).

    ``u ~ Uniform[0, 1)`` from ``rng.random(batch)``; the token is the first ``i`` whose cumulative
    probability ``P_i = p_0 + ... + p_i`` exceeds ``u``, so token ``i`` (interval ``[P_{i-1}, P_i)``)
    is drawn with probability ``p_i``. Rows need not be normalised (u is scaled by the row total)."""
    cumulative = np.cumsum(probs, axis=-1)
    # Scale u by the row total (1 up to rounding) rather than assuming it is exactly 1.
    u = rng.random(probs.shape[0]) * cumulative[:, -1]
    # "first i with P_i > u" = the number of P_i that are <= u (P is non-decreasing).
    token_ids = (cumulative <= u[:, None]).sum(axis=-1)
    # Rounding can make u * total == total; never step past the last token with p > 0.
    last_possible = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(token_ids, last_possible).astype(np.int64)


def kept_mass(logits, params: SamplingParams, previous_tokens=None) -> np.ndarray:
    """Per row, how much probability the filters keep, measured before filtering.

    Base distribution: ``q = softmax(z' / T)``, with ``z'`` the logits after the repetition
    penalty and ``T`` the temperature. Returns ``sum of q_i over the tokens that top-k, top-p and
    min-p keep`` (1.0 when no filter is set), in the logits' dtype, shape (batch,).
    For ``temperature == 0`` it returns 1.0: greedy keeps only the argmax, which carries all of
    the temperature-0 (one-hot) distribution."""
    logits = _checked_pipeline_input(logits, params, previous_tokens)
    if params.is_greedy:
        return np.ones(logits.shape[0], dtype=logits.dtype)
    base = _softmax(_temperature(logits, params.temperature).astype(np.float64))
    return (base * np.isfinite(_filter(logits, params))).sum(axis=-1).astype(logits.dtype)
