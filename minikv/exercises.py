"""Checking the lessons' exercises: "not solved yet", "correct", or a clear failure.

Every exercise cell of a lesson (``lessons/src/*.py``) has the same shape::

    # --- your solution ---
    window_mask = ...          # a stub: replace the ... with your answer
    # --- check ---
    with check(1, window_mask):
        assert window_mask.sum() == 15

or, when the answer is a function, a stub that raises ``NotImplementedError``::

    # --- your solution ---
    def top_k_by_hand(z, k):
        raise NotImplementedError("exercise 1: keep the k largest logits of each row")
    # --- check ---
    with check(1, top_k_by_hand):
        assert np.array_equal(top_k_by_hand(logits, 5), sampling.top_k_filter(logits, 5))

``check(number, *answers)`` is a context manager around the asserts. When the block ends it prints

* ``exercise N: not solved yet`` if an answer is still the stub (``...``, i.e. ``Ellipsis``) or the
  block raised ``NotImplementedError``; the exception, if any, is swallowed, so running a lesson as
  shipped ("Run All") goes through every cell;
* ``exercise N: correct`` (plus ``exercise.note``, if the block set one) if the block finished;
* otherwise it raises :class:`WrongAnswer` (an ``AssertionError``) naming the exercise and what
  failed, so a wrong answer stops the notebook at the cell that has it.

The solutions live in ``lessons/solutions/``; ``lessons/_build.py --solved`` puts them in place of
the stubs. See ``lessons/README.md``.
"""

from __future__ import annotations

import traceback

__all__ = ["check", "WrongAnswer", "NOT_SOLVED", "CORRECT"]

NOT_SOLVED = "exercise {number}: not solved yet"
CORRECT = "exercise {number}: correct"


class WrongAnswer(AssertionError):
    """An exercise's check failed on an answer that is not the stub."""


class check:
    """Context manager that checks exercise ``number`` given the student's ``answers`` (see the module doc)."""

    def __init__(self, number: int, *answers):
        self.number = number
        self.answers = answers
        self.note: str | None = None   # set inside the block to print more after "correct"
        self.outcome: str | None = None  # "not solved", "correct" or "wrong", once the block has run

    def __enter__(self) -> "check":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stubs = [i for i, answer in enumerate(self.answers, 1) if answer is Ellipsis]
        if stubs or (exc_type is not None and issubclass(exc_type, NotImplementedError)):
            self.outcome = "not solved"
            where = ""
            if stubs and len(self.answers) > 1:
                where = f" (answer {', '.join(map(str, stubs))} of {len(self.answers)} is still `...`)"
            print(NOT_SOLVED.format(number=self.number) + where)
            return True   # swallow the error a stub causes: the rest of the lesson still runs
        if exc_type is None:
            self.outcome = "correct"
            message = CORRECT.format(number=self.number)
            print(message + (f": {self.note}" if self.note else ""))
            return False
        self.outcome = "wrong"
        if issubclass(exc_type, AssertionError):
            # The failing assert's own line says what was checked; its message (if any) says more.
            frame = traceback.extract_tb(tb)[-1]
            failed = frame.line or f"the assert on line {frame.lineno}"   # no source text under a bare exec()
            detail = f"this check failed: {failed}" + (f" ({exc})" if str(exc) else "")
        else:
            detail = f"your answer raised {exc_type.__name__}: {exc}"
        raise WrongAnswer(f"exercise {self.number}: not correct yet; {detail}") from exc
