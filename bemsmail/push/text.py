"""Fitting mail text into a provider's payload limit: JSON byte costs and cuts that never split a character."""

from __future__ import annotations

ELLIPSIS = "\u2026"
_ELLIPSIS_COST = len(ELLIPSIS.encode("utf-8"))
_SHORT_ESCAPES = frozenset("\n\r\t\b\f")


def char_cost(ch: str) -> int:
    """Bytes one character takes inside a JSON string written as UTF-8 (ensure_ascii=False)."""
    code = ord(ch)
    if code >= 0x80:
        return len(ch.encode("utf-8", "surrogatepass"))
    if ch in '"\\':
        return 2
    if code < 0x20:
        return 2 if ch in _SHORT_ESCAPES else 6
    return 1


def json_cost(text: str | None) -> int:
    """Bytes `text` takes inside a JSON string (without the quotes); 0 for None."""
    return 0 if text is None else sum(map(char_cost, text))


def fit(text: str, budget: int) -> str:
    """`text`, or its longest prefix plus an ellipsis, costing at most `budget` JSON bytes; cuts fall between
    characters, so the result is always valid UTF-8."""
    if json_cost(text) <= budget:
        return text
    room = budget - _ELLIPSIS_COST
    if room < 0:
        return ""
    used = 0
    for i, ch in enumerate(text):
        used += char_cost(ch)
        if used > room:
            return text[:i] + ELLIPSIS
    return text  # not reached: the whole text was over budget
