"""The range of a size a caller asks for: batch sizes, sequence lengths, token budgets (no torch: the CLI's parser
uses it too)."""
from __future__ import annotations

import numbers

# Past any memory already, and small enough that what is computed from a size (prompt + max_new_tokens, a KV
# cache's bytes) stays an integer that torch and mmap take: 1e19 positions made mmap raise an OverflowError.
MAX_SIZE = 2**31 - 1
# Attempts (rsd generate, rsd demo) or samples (rsd eval) per problem: each is a request made up front, so a
# count past any use (1e20) grew a list for minutes, to gigabytes, before failing.
MAX_SAMPLES = 10_000


def check_size(name: str, value, lo: int) -> int:
    """``value`` as a Python int if it is an integer (numpy's too) in [lo, MAX_SIZE], else a ValueError naming
    ``name`` and the range."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not lo <= value <= MAX_SIZE:
        raise ValueError(f"{name} = {value!r}: must be an integer in [{lo}, {MAX_SIZE}]")
    return int(value)
