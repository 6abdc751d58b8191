"""Boundary checks shared by every backend of ``rsd_sample``, ``sample_tokens`` and ``rsd_verify``.

Shapes, dtypes and devices always: they cost no host sync and run the same under torch.compile. Values
(parameters in params.RANGES, uniforms in [0, 1]) only of tensors that can be read without one: real CPU
tensors, outside a compiled graph. So a CPU call is checked whole; a CUDA call only in its row parameters
that arrive on the CPU, never in its uniforms or logits (reading those would sync the host, which a step
captured as a CUDA graph must not). ``values=False`` skips them: the engine's rows come from SamplingParams,
which checked the same ranges, and its step must not read back what it decodes (tests/test_host_syncs.py)."""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..params import RANGES, Range

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UNIFORMS = Range(0.0, 1.0, "in [0, 1] (randomness.py draws them)")


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """An integer parameter (top_k, proposal_trials) as the kernels read it: int32. A wider value is clamped to
    int32's range, which keeps its meaning (past V: every id; <= 0: off), where a cast wraps (2**32 + 1 became 1)."""
    return t if t.dtype == torch.int32 else t.to(torch.int64).clamp(-2**31, 2**31 - 1).to(torch.int32)


def _tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _logits(name, logits, shape):
    _tensor(name, logits)
    if logits.dim() != len(shape) or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be a [{', '.join(shape)}] float32, bfloat16 or float16 tensor, got dtype "
                         f"{logits.dtype} of shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (shape {tuple(logits.shape)}): the ops sample from V >= 1 "
                         "ids")


def _row_vector(name, value, B, floating):
    _tensor(name, value)
    if value.shape != (B,):
        raise ValueError(f"{name} must have shape [B={B}], got {tuple(value.shape)}")
    if floating and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not floating and (value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex()):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")


def _row_params(params, B):
    from .reference import RowParams

    if getattr(params, "_fields", None) != RowParams._fields:
        raise ValueError(f"params must be a RowParams, got {type(params).__name__}")
    for name, value in zip(RowParams._fields, params):
        _row_vector(f"params.{name}", value, B, not RANGES[name].integer)


def _mask(name, mask, limit, vocabulary="the logits' vocabulary"):
    _tensor(name, mask)
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a 1-D bool tensor [V], got {mask.dtype} of shape {tuple(mask.shape)}")
    if not 1 <= mask.numel() <= limit:
        raise ValueError(f"{name} covers V={mask.numel()} ids, which must be in [1, {limit}] ({vocabulary})")


def _masks(proposal_mask, fallback_mask, Vt, Vs):
    vocabulary = f"min(teacher vocab {Vt}, student vocab {Vs})"
    _mask("proposal_mask", proposal_mask, min(Vt, Vs), vocabulary)
    _mask("fallback_mask", fallback_mask, min(Vt, Vs), vocabulary)
    if fallback_mask.numel() != proposal_mask.numel():
        raise ValueError(f"fallback_mask has {fallback_mask.numel()} entries but proposal_mask has "
                         f"{proposal_mask.numel()}: both cover the shared token space [V]")


def _same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " +
                         ", ".join(f"{name} on {d}" for name, d in devices.items()))


def _in_range(name, t, rule):
    """Refuses the first entry of ``t`` outside ``rule``, if t can be read without a host sync (module docstring).
    Floats are compared in float32, as the kernels read them."""
    if t.device.type != "cpu" or isinstance(t, FakeTensor) or t.numel() == 0:
        return
    x = t.float() if t.dtype.is_floating_point else t
    ok = (x > rule.lo) if rule.open_low else (x >= rule.lo)
    if rule.hi is not None:
        ok &= x <= rule.hi
    if x.dtype.is_floating_point:
        ok &= x.isfinite()
    if rule.also is not None:
        ok |= x == rule.also
    if not bool(ok.all()):
        where = (~ok).nonzero()[0].tolist()
        value, read = t[tuple(where)].item(), x[tuple(where)].item()
        shown = _shown(value, t.dtype)
        if read != value and math.isfinite(value):  # e.g. top_p 1e-46 in float64: 0 as the kernels read it
            shown += f" ({read:g} in float32, as the ops read it)"
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {shown} is out of range: must be {rule.allowed}")


def _shown(value, dtype) -> str:
    """``value`` (an entry of a ``dtype`` tensor) in the fewest significant digits, 6 at least, that give it back in
    ``dtype``: "{:g}" alone showed float32(1.0000001), an out-of-range top_p, as "1"."""
    if not isinstance(value, float) or not math.isfinite(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    for digits in range(6, 18):
        shown = f"{value:.{digits}g}"
        if torch.tensor(float(shown), dtype=dtype).item() == value:
            return shown
    return repr(value)


def _check_values(uniforms, **params):
    if torch.compiler.is_compiling():
        return  # no values at trace time; the graph's eager runs and SamplingParams check them
    for name, t in params.items():
        _in_range(name, t, RANGES[name.removeprefix("params.")])
    _in_range("uniforms", uniforms, UNIFORMS)


def check_rsd_sample_inputs(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask, *,
                            values=True):
    """rsd_sample's inputs (reference.py's contract). The row parameters may be on the logits' device or on
    the CPU (each backend copies them over)."""
    from .reference import RowParams

    _logits("teacher_logits", teacher_logits, ("B", "V"))
    _logits("student_logits", student_logits, ("B", "V"))
    B, Vt = teacher_logits.shape
    if student_logits.shape[0] != B:
        raise ValueError(f"student_logits has {student_logits.shape[0]} rows but teacher_logits has {B}: both must "
                         "be [B, vocab] with the same B")
    _tensor("uniforms", uniforms)
    if uniforms.dim() != 2 or uniforms.shape[0] != B or uniforms.shape[1] < 1 or uniforms.dtype != torch.float32:
        raise ValueError(f"uniforms must be float32 [B={B}, 1 + max proposals] (fallback draw, then proposals; see "
                         f"randomness.step_uniforms), got {uniforms.dtype} of shape {tuple(uniforms.shape)}")
    _row_params(params, B)
    _masks(proposal_mask, fallback_mask, Vt, student_logits.shape[1])
    _same_device(teacher_logits=teacher_logits, student_logits=student_logits, uniforms=uniforms,
                 proposal_mask=proposal_mask, fallback_mask=fallback_mask)
    device = teacher_logits.device
    for name, p in zip(RowParams._fields, params):
        if p.device != device and p.device.type != "cpu":
            raise ValueError(f"params.{name} is on {p.device}: row parameters must be on the logits' device "
                             f"({device}) or on the CPU")
    if values:
        _check_values(uniforms, **{f"params.{name}": getattr(params, name) for name in RowParams._fields})


def check_sample_inputs(logits, uniforms, temperature, top_k, top_p, mask, *, values=True):
    _logits("logits", logits, ("B", "V"))
    B = logits.shape[0]
    _tensor("uniforms", uniforms)
    if tuple(uniforms.shape) != (B,) or uniforms.dtype != torch.float32:
        raise ValueError(f"uniforms must be float32 [B={B}] (one draw per row), got {uniforms.dtype} of shape "
                         f"{tuple(uniforms.shape)}")
    _row_vector("temperature", temperature, B, True)
    _row_vector("top_k", top_k, B, False)
    _row_vector("top_p", top_p, B, True)
    _mask("mask", mask, logits.shape[1])
    _same_device(logits=logits, uniforms=uniforms, temperature=temperature, top_k=top_k, top_p=top_p, mask=mask)
    if values:
        _check_values(uniforms, temperature=temperature, top_k=top_k, top_p=top_p)


def check_verify_inputs(teacher_logits, student_logits, draft, num_draft, uniforms, params, proposal_mask,
                        fallback_mask, *, values=True):
    from ..randomness import NUM_ROUND_DRAWS
    from .reference import RowParams

    _logits("teacher_logits", teacher_logits, ("B", "G+1", "V"))
    _logits("student_logits", student_logits, ("B", "G+1", "V"))
    B, P, Vt = teacher_logits.shape
    if P < 1:
        raise ValueError("teacher_logits has no positions: a round verifies G+1 >= 1 positions")
    if tuple(student_logits.shape[:2]) != (B, P):
        raise ValueError(f"student_logits is {tuple(student_logits.shape)} but teacher_logits is "
                         f"{tuple(teacher_logits.shape)}: both must be [B, G+1, vocab] with the same B and G+1")
    _tensor("draft", draft)
    if tuple(draft.shape) != (B, P - 1) or draft.dtype != torch.int64:
        raise ValueError(f"draft must be int64 [B={B}, G={P - 1}], got {draft.dtype} of shape {tuple(draft.shape)}")
    _tensor("num_draft", num_draft)
    if tuple(num_draft.shape) != (B,) or num_draft.dtype != torch.int32:
        raise ValueError(f"num_draft must be int32 [B={B}] with values in [0, G={P - 1}], got {num_draft.dtype} of "
                         f"shape {tuple(num_draft.shape)}")
    _tensor("uniforms", uniforms)
    if uniforms.dim() != 3 or tuple(uniforms.shape[:2]) != (B, P) or uniforms.shape[2] < NUM_ROUND_DRAWS \
            or uniforms.dtype != torch.float32:
        raise ValueError(f"uniforms must be float32 [B={B}, G+1={P}, D>={NUM_ROUND_DRAWS}] (see "
                         f"randomness.round_uniforms), got {uniforms.dtype} of shape {tuple(uniforms.shape)}")
    _row_params(params, B)
    _masks(proposal_mask, fallback_mask, Vt, student_logits.shape[2])
    named = {f"params.{name}": getattr(params, name) for name in RowParams._fields}
    _same_device(teacher_logits=teacher_logits, student_logits=student_logits, draft=draft, num_draft=num_draft,
                 uniforms=uniforms, proposal_mask=proposal_mask, fallback_mask=fallback_mask, **named)
    if values:
        _check_values(uniforms, **named)
