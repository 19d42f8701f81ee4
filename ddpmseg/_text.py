"""Small helpers for the one-line messages and summaries users read."""

from __future__ import annotations

from typing import Sequence


def few(names: Sequence[str], n: int = 3) -> str:
    """``a, b, c, ...``: the first ``n`` names, for one-line summaries."""
    return ", ".join(str(x) for x in list(names)[:n]) + (", ..." if len(names) > n else "")


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 image``, ``2 images`` (``words`` for an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
