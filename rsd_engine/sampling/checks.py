"""Boundary checks shared by every backend of ``sample_tokens`` and ``rsd_verify``: shapes, dtypes and
devices only, so they cost no host sync and run the same under torch.compile."""
from __future__ import annotations

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """An integer parameter (top_k, proposal_trials) as the kernels read it: int32. A wider value is clamped to
    int32's range, which keeps its meaning (past V: every id; <= 0: off), where a cast wraps (2**32 + 1 became 1)."""
    return t if t.dtype == torch.int32 else t.to(torch.int64).clamp(-2**31, 2**31 - 1).to(torch.int32)


def _tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _row_vector(name, value, B, floating):
    _tensor(name, value)
    if tuple(value.shape) != (B,):
        raise ValueError(f"{name} must have shape [B={B}], got {tuple(value.shape)}")
    if floating and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not floating and (value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex()):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")


def _mask(name, mask, limit):
    _tensor(name, mask)
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a 1-D bool tensor [V], got {mask.dtype} of shape {tuple(mask.shape)}")
    if not 1 <= mask.numel() <= limit:
        raise ValueError(f"{name} covers V={mask.numel()} ids, which must be in [1, {limit}] (the logits' vocabulary)")


def _same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " +
                         ", ".join(f"{name} on {d}" for name, d in devices.items()))


def check_sample_inputs(logits, uniforms, temperature, top_k, top_p, mask):
    _tensor("logits", logits)
    if logits.dim() != 2 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be a [B, V] float32, bfloat16 or float16 tensor, got {logits.dtype} of shape "
                         f"{tuple(logits.shape)}")
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


def check_verify_inputs(teacher_logits, student_logits, draft, num_draft, uniforms, params, proposal_mask,
                        fallback_mask):
    from ..randomness import NUM_ROUND_DRAWS
    from .reference import RowParams

    for name, logits in (("teacher_logits", teacher_logits), ("student_logits", student_logits)):
        _tensor(name, logits)
        if logits.dim() != 3 or logits.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name} must be a [B, G+1, V] float32, bfloat16 or float16 tensor, got {logits.dtype} "
                             f"of shape {tuple(logits.shape)}")
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
    if getattr(params, "_fields", None) != RowParams._fields:
        raise ValueError(f"params must be a RowParams, got {type(params).__name__}")
    ints = {"top_k", "student_top_k", "proposal_trials"}
    for name in RowParams._fields:
        _row_vector(f"params.{name}", getattr(params, name), B, name not in ints)
    _mask("proposal_mask", proposal_mask, min(Vt, student_logits.shape[2]))
    _mask("fallback_mask", fallback_mask, min(Vt, student_logits.shape[2]))
    if fallback_mask.numel() != proposal_mask.numel():
        raise ValueError(f"fallback_mask has {fallback_mask.numel()} entries but proposal_mask has "
                         f"{proposal_mask.numel()}: both cover the shared token space [V]")
    _same_device(teacher_logits=teacher_logits, student_logits=student_logits, draft=draft, num_draft=num_draft,
                 uniforms=uniforms, proposal_mask=proposal_mask, fallback_mask=fallback_mask,
                 **{f"params.{name}": getattr(params, name) for name in RowParams._fields})
