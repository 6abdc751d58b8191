"""Per-request sampling parameters for Reverse Speculative Decoding (DESIGN.md §2)."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field

# The uniforms of one step are laid out as [fallback draw, proposal 0, ..., proposal K-1]; the width
# is fixed so that a decode step has static shapes whatever the batch asks for.
MAX_PROPOSAL_TRIALS = 16
# Temperatures the float32 sampling step can divide by: past these 1/t or t overflows float32 (a subnormal t
# made every backend emit NaN weights, hence flags or the fallback's token, on finite logits).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e30


@dataclass(frozen=True)
class Range:
    """The values one sampling parameter may take: ``lo`` to ``hi`` (``lo`` excluded if ``open_low``; no upper
    bound if ``hi`` is None), or exactly ``also``; ``allowed`` says so in words for messages. SamplingParams
    checks numbers with ``contains`` (any numbers.Integral for an integer rule, numbers.Real else, as numpy's are;
    never a bool); the sampler ops check the same rule on tensors (sampling/checks.py)."""

    lo: float
    hi: float | None
    allowed: str
    open_low: bool = False
    also: float | None = None
    integer: bool = False

    def contains(self, value) -> bool:
        if not _is_number(value, self.integer):
            return False
        if not self.integer and not math.isfinite(value):
            return False
        if self.also is not None and value == self.also:
            return True
        return (value > self.lo if self.open_low else value >= self.lo) and (self.hi is None or value <= self.hi)


_TEMPERATURES = f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
_ARGMAX_TEMPERATURE = Range(MIN_TEMPERATURE, MAX_TEMPERATURE, f"0 (argmax) or in {_TEMPERATURES}", also=0.0)
_TOP_P = Range(0.0, 1.0, "in (0, 1]", open_low=True)
_TOP_K = Range(0, None, "an integer >= 0 (0 disables top-k)", integer=True)
# The legal values of every per-row parameter (the fields of sampling.RowParams), for SamplingParams and the ops.
RANGES: dict[str, Range] = {
    "temperature": _ARGMAX_TEMPERATURE,
    "top_k": _TOP_K,
    "top_p": _TOP_P,
    "threshold": Range(0.0, 1.0, "in [0, 1]"),
    "check_temperature": Range(MIN_TEMPERATURE, MAX_TEMPERATURE, f"in {_TEMPERATURES}"),
    "student_temperature": _ARGMAX_TEMPERATURE,
    "student_top_k": _TOP_K,
    "student_top_p": _TOP_P,
    "proposal_trials": Range(1, MAX_PROPOSAL_TRIALS, f"an integer in [1, {MAX_PROPOSAL_TRIALS}]", integer=True),
}


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Defaults are the paper's (arXiv 2509.22230).

    Teacher proposals follow ``truncate(softmax(lT / temperature), top_k, top_p)``; a proposal is kept
    iff ``softmax(lS / check_temperature)[x] >= threshold``; otherwise the student writes the token
    from ``truncate(softmax(lS / student_temperature), student_top_k, student_top_p)``.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    threshold: float = 0.01
    check_temperature: float = 1.0
    student_temperature: float = 0.7
    student_top_p: float = 0.95
    student_top_k: int = 0
    proposal_trials: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False  # run to max_new_tokens through EOS (benchmarks)

    def __post_init__(self):
        # Lists are accepted for convenience; stored as tuples so params stay hashable.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop, str))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, int))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos = {self.ignore_eos!r} must be True or False")
        _check_int(self, "max_new_tokens", 1, None)
        for name, rule in RANGES.items():
            value = getattr(self, name)
            if not rule.contains(value):
                why = (" (the float32 sampling step divides by it)" if "temperature" in name
                       and _is_number(value) and math.isfinite(value) and value > 0 else "")
                raise ValueError(f"SamplingParams.{name} = {value!r} is out of range: must be {rule.allowed}{why}")
            object.__setattr__(self, name, _plain(value, rule.integer))
        if self.seed is not None:
            _check_int(self, "seed", 0, 2**63 - 1)
        for i, tok in enumerate(self.stop_token_ids):
            if tok < 0:
                raise ValueError(f"SamplingParams.stop_token_ids[{i}] = {tok}: token ids must be >= 0")
        for i, s in enumerate(self.stop):
            if not s:
                raise ValueError(f"SamplingParams.stop[{i}] is empty: stop strings must be non-empty")


def _is_number(value, integer: bool = False) -> bool:
    """An integer (any numbers.Integral, numpy's int64 included) or, unless `integer`, any real number (numbers.Real,
    numpy's float32 included); never a bool (Python's is an int subclass; numpy's bool_ is neither)."""
    return isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)


def _plain(value, integer: bool):
    """A checked number as Python's int or float (numpy's scalars are stored, hashed and written as plain ones)."""
    if integer:
        return operator.index(value)
    return value if type(value) in (int, float) else float(value)


def _as_tuple(name, value, kind):
    if isinstance(value, (str, numbers.Integral)):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"SamplingParams.{name} must be a sequence of {kind.__name__}, got {value!r}") from None
    for v in out:
        if not (_is_number(v, integer=True) if kind is int else isinstance(v, kind)):
            raise ValueError(f"SamplingParams.{name} must hold {kind.__name__} values, got {v!r}")
    return tuple(operator.index(v) for v in out) if kind is int else out


def _check_int(params, name, lo, hi, allowed=None):
    value = getattr(params, name)
    ok = _is_number(value, integer=True) and value >= lo and (hi is None or value <= hi)
    if not ok:
        allowed = allowed or (f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
        raise ValueError(f"SamplingParams.{name} = {value!r} is out of range: must be {allowed}")
    object.__setattr__(params, name, operator.index(value))
