"""Checks of input values shared by the core and the nodes: integers (not bools), reals, a batch index,
ASCII digits and their value, and a long text as an error message shows it."""

from __future__ import annotations

import numbers
import operator


def is_int(value) -> bool:
    """Whether value is an integer: a Python or numpy int, not a bool."""
    # a Python int first: the ABC's check takes ~10 times as long (~170 000 tensors of a header, 7 ints each)
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def integer_index(value) -> int | None:
    """value as an int when it is one (a Python, numpy or 0-d torch integer: anything with __index__),
    else None; bools are not integers here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_real(value) -> bool:
    """Whether value is a real number: a Python or numpy int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_batch_index(batch_index, batch_size: int) -> None:
    """A ValueError naming ``batch_index`` unless it is an int (not a bool) in [0, batch_size)."""
    if not is_int(batch_index) or not 0 <= batch_index < batch_size:
        raise ValueError(f"batch_index must be an int in [0, {batch_size}), got {batch_index!r}")


def is_ascii_digits(text: str) -> bool:
    """Whether text is one or more ASCII digits 0-9 (str.isdecimal alone also takes other scripts' digits)."""
    return text.isascii() and text.isdecimal()


def shown_text(text: str, limit: int = 40) -> str:
    """text -> its repr, or the repr of its first half-limit characters and its length when longer than limit."""
    return repr(text) if len(text) <= limit else f"{text[:limit // 2]!r}... ({len(text)} characters)"


# The value ascii_int gives digits of a larger number: beyond any grid level, step or cluster count.
DIGITS_BEYOND = 10**9


def significant_digits(digits: str) -> str:
    """ASCII digits -> them without leading zeros ('0' for zeros only): '007' -> '7'."""
    return digits.lstrip("0") or "0"


def ascii_int(digits: str) -> int:
    """ASCII digits (is_ascii_digits) -> their value, or DIGITS_BEYOND when it is larger. Python's int()
    refuses text of more than 4300 digits (leading zeros too) with a ValueError in its own words, which
    would reach the user instead of the message naming the input."""
    digits = significant_digits(digits)
    return DIGITS_BEYOND if len(digits) > len(str(DIGITS_BEYOND)) else min(int(digits), DIGITS_BEYOND)
