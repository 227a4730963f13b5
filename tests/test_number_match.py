"""GSM8K-style numeric answer matching (`lorakit.data.metrics`): strict "#### N" and flexible last number."""

from __future__ import annotations

from decimal import Decimal

import pytest

from lorakit.data.metrics import (
    final_answer_number,
    flexible_number_match,
    last_number,
    parse_number,
    strict_number_match,
)

REFERENCE = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


@pytest.mark.parametrize("text, number", [
    ("18", Decimal(18)), ("$1,000.", Decimal(1000)), ("1000.00", Decimal(1000)), ("-3", Decimal(-3)),
    (".5", Decimal("0.5")), ("..", None), ("$", None), ("1.2.3", None), ("", None), (None, None),
])
def test_parse_number_drops_dollar_commas_and_a_trailing_period(text, number):
    assert parse_number(text) == number


def test_final_answer_is_the_number_after_the_first_marker():
    assert final_answer_number(REFERENCE) == 18
    assert final_answer_number("#### 7\nthen #### 8") == 7
    assert final_answer_number("####-1,250") == -1250
    assert final_answer_number("the answer is 18") is None


def test_last_number_skips_runs_that_do_not_parse():
    assert last_number("2 + 3 = 5, so she pays $12.50.") == Decimal("12.5")
    assert last_number("It is 4 ... ") == 4
    assert last_number("no digits here") is None


@pytest.mark.parametrize("prediction, strict, flexible", [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", True, True),
    ("#### 18.00", True, True),                  # equal as decimals
    ("She makes $18 every day.", False, True),   # right number, not in the "####" format
    ("#### 18\nAnd 5 more.", True, False),       # first marker counts for strict; last number for flexible
    ("#### 17", False, False),
    ("", False, False),
])
def test_strict_and_flexible_matches(prediction, strict, flexible):
    assert strict_number_match(prediction, REFERENCE) is strict
    assert flexible_number_match(prediction, REFERENCE) is flexible


def test_a_bare_number_reference_is_read_as_the_number():
    assert strict_number_match("#### 1,000", "1000") and flexible_number_match("so 1000", "1000")
    assert not strict_number_match("#### 5", "no number")
