"""Answer-matching metrics for evaluating generated responses."""

from __future__ import annotations

import re
from decimal import Decimal

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


# --- numeric answers (GSM8K-style "#### 42") ---------------------------------------------------
# The two extraction rules of lm-evaluation-harness's gsm8k task: "strict-match" reads the number
# after the first "####", "flexible-extract" the last number-looking run anywhere in the text.
_FINAL_ANSWER = re.compile(r"####\s*(-?[$0-9.,]+)")
_ANY_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def parse_number(text: str | None) -> Decimal | None:
    """The number `text` spells, or None: "$", "," and one trailing "." are dropped first, so
    "$1,000." and "1000.00" both parse to 1000 (compared as decimals, "1000.00" == "1000")."""
    if text is None:
        return None
    cleaned = text.strip().replace("$", "").replace(",", "")
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", cleaned):
        return None
    return Decimal(cleaned)


def final_answer_number(text: str) -> Decimal | None:
    """The number after the first "####" marker (GSM8K's answer format), or None when there is none."""
    match = _FINAL_ANSWER.search(text)
    return parse_number(match.group(1)) if match else None


def last_number(text: str) -> Decimal | None:
    """The last number anywhere in `text` (runs that do not parse, like "..", are skipped), or None."""
    for match in reversed(_ANY_NUMBER.findall(text)):
        number = parse_number(match)
        if number is not None:
            return number
    return None


def strict_number_match(prediction: str, reference: str) -> bool:
    """True when the prediction states its answer as "#### N" (the first such marker counts) and N
    equals the reference's "####" number. A reference without "####" is read as a bare number."""
    expected = final_answer_number(reference) if "####" in reference else parse_number(reference)
    found = final_answer_number(prediction)
    return expected is not None and found is not None and found == expected


def flexible_number_match(prediction: str, reference: str) -> bool:
    """True when the last number anywhere in the prediction equals the reference's "####" number
    (or the reference itself when it is a bare number), whatever the answer's format."""
    expected = final_answer_number(reference) if "####" in reference else parse_number(reference)
    found = last_number(prediction)
    return expected is not None and found is not None and found == expected
