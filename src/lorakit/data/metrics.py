"""Answer-matching metrics for evaluating generated responses."""

from __future__ import annotations

import re

_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Normalise an answer for comparison.

    Steps, in order: strip surrounding whitespace, lowercase, collapse every run of whitespace
    to one space, drop trailing periods (and whitespace before them). ``" The  Answer. "`` and
    ``"the answer"`` both become ``"the answer"``.
    """
    text = _WHITESPACE.sub(" ", text.strip().lower())
    return text.rstrip(". ").strip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> bool:
    """True when the prediction's first line equals the reference after ``normalize_answer``.

    Only the first non-empty line of the prediction counts, because a model that gives the
    right answer and then keeps talking (a new line of explanation, a repeated question) has
    still answered correctly; anything else on that first line makes it wrong.
    """
    lines = [line for line in prediction.strip().splitlines() if line.strip()]
    first_line = lines[0] if lines else ""
    return normalize_answer(first_line) == normalize_answer(reference)
