"""Per-request sampling parameters for Reverse Speculative Decoding (DESIGN.md §2)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# The uniforms of one step are laid out as [fallback draw, proposal 0, ..., proposal K-1]; the width
# is fixed so that a decode step has static shapes whatever the batch asks for.
MAX_PROPOSAL_TRIALS = 16
# Temperatures the float32 sampling step can divide by: past these 1/t or t overflows float32 (a subnormal t
# made every backend emit NaN weights, hence flags or the fallback's token, on finite logits).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e30


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
        _check_int("max_new_tokens", self.max_new_tokens, 1, None)
        _check_temperature("temperature", self.temperature, argmax=True)
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", open_low=True)
        _check_int("top_k", self.top_k, 0, None, "an integer >= 0 (0 disables top-k)")
        _check_float("threshold", self.threshold, 0.0, 1.0, "in [0, 1]")
        _check_temperature("check_temperature", self.check_temperature, argmax=False)
        _check_temperature("student_temperature", self.student_temperature, argmax=True)
        _check_float("student_top_p", self.student_top_p, 0.0, 1.0, "in (0, 1]", open_low=True)
        _check_int("student_top_k", self.student_top_k, 0, None, "an integer >= 0 (0 disables top-k)")
        _check_int("proposal_trials", self.proposal_trials, 1, MAX_PROPOSAL_TRIALS)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        for i, tok in enumerate(self.stop_token_ids):
            if tok < 0:
                raise ValueError(f"SamplingParams.stop_token_ids[{i}] = {tok}: token ids must be >= 0")
        for i, s in enumerate(self.stop):
            if not s:
                raise ValueError(f"SamplingParams.stop[{i}] is empty: stop strings must be non-empty")


def _as_tuple(name, value, kind):
    if isinstance(value, (str, int)):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"SamplingParams.{name} must be a sequence of {kind.__name__}, got {value!r}") from None
    for v in out:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError(f"SamplingParams.{name} must hold {kind.__name__} values, got {v!r}")
    return out


def _check_int(name, value, lo, hi, allowed=None):
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and value >= lo and (hi is None or value <= hi)
    if not ok:
        allowed = allowed or (f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")
        raise ValueError(f"SamplingParams.{name} = {value!r} is out of range: must be {allowed}")


def _check_temperature(name, value, *, argmax: bool):
    zero = "0 (argmax) or " if argmax else ""
    _check_float(name, value, 0.0, None, f"{zero}in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]", open_low=not argmax)
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"SamplingParams.{name} = {value!r} is out of range: must be {zero}in "
                         f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (the float32 sampling step divides by it)")


def _check_float(name, value, lo, hi, allowed, open_low=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_low else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ValueError(f"SamplingParams.{name} = {value!r} is out of range: must be {allowed}")
