"""The record node's `steps` input: which sampling steps a run records (StepSelection), read from its
text, and step indices written back as ranges for messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core.values import ascii_int, is_ascii_digits, shown_text, significant_digits


@dataclass(frozen=True)
class StepSelection:
    """Which sampling steps are recorded: mode "last", "mean", or "range" over [first, last] (0-based)."""

    mode: str
    first: int = 0
    last: int = 0
    # the range's ends as typed (leading zeros dropped) where they differ from the values read: ends past
    # 10**9 are read as 10**9 (ascii_int) but named as typed
    typed: tuple[str, str] | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        if self.mode != "range":
            return self.mode
        first, last = self.typed or (str(self.first), str(self.last))
        return first if first == last else f"{first}-{last}"

def _magnitude(digits: str) -> tuple[int, str]:
    """ASCII digits -> a key that orders them by their value, of any length (no int() of thousands of digits)."""
    digits = significant_digits(digits)
    return len(digits), digits


def _shown_digits(digits: str) -> str:
    """ASCII digits -> them without leading zeros, or their first 12 and their count when longer."""
    digits = significant_digits(digits)
    return digits if len(digits) <= 15 else f"{digits[:12]}... ({len(digits)} digits)"


def parse_steps(text: str) -> StepSelection:
    """'last' | 'mean' | 'N' | 'A-B' (0-based step indices, inclusive) -> StepSelection."""
    if not isinstance(text, str):
        raise TypeError(f"steps: expected a string such as 'last', 'mean' or '3-7', got {type(text).__name__}")
    t = text.strip().lower().replace(" ", "")
    if t in ("last", "mean"):
        return StepSelection(t)
    parts = t.split("-")
    if 1 <= len(parts) <= 2 and all(is_ascii_digits(p) for p in parts):
        first, last = ascii_int(parts[0]), ascii_int(parts[-1])
        # A <= B compared as typed: both ends past 10**9 read as 10**9 alike, so '3000000000-2000000000'
        # would pass as the step 10**9
        if _magnitude(parts[0]) <= _magnitude(parts[-1]):
            typed = tuple(_shown_digits(p) for p in (parts[0], parts[-1]))
            return StepSelection("range", first, last, typed if typed != (str(first), str(last)) else None)
    raise ValueError(
        f"steps: expected 'last', 'mean', a step 'N' or a range 'A-B' with A <= B (0-based, inclusive), got {shown_text(text, 80)}"
    )


def steps_label(steps) -> str:
    """{1, 2, 3, 6} -> '1-3,6': step indices as ranges."""
    ordered = sorted(steps)
    parts, first = [], 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:  # a run of consecutive steps ends
            a, b = ordered[first], ordered[i - 1]
            parts.append(str(a) if a == b else f"{a}-{b}")
            first = i
    return ",".join(parts)
