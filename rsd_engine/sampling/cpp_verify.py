"""The C++ ``sample_tokens`` and ``rsd_verify`` (csrc/rsd_verify.h) behind the reference signatures.

Both are torch custom ops (``rsd_engine::sample_tokens_cpp``, ``rsd_engine::rsd_verify_cpp``) with fake
(shape-only) implementations, so a draft or verify step that calls them compiles with
``torch.compile(fullgraph=True)`` on CPU. Shapes and dtypes are checked here as the dispatcher
(``rsd_engine.sampling``) checks them (the raw-pointer kernel reads past a wrong one), with the CPU-only rule.
"""
from __future__ import annotations

import torch

from ..randomness import FLAG_DRAW, KEEP_DRAW, NUM_DRAWS, RESIDUAL_DRAW
from .checks import as_int32, check_sample_inputs, check_verify_inputs
from .cpp import LOGIT_DTYPES, _check_cpu, extension
from .reference import RowParams
from .verify_reference import VerifyOutput

_INT_PARAMS = frozenset({"top_k", "student_top_k", "proposal_trials"})


def _vocab_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def sample_tokens_cpp(logits, uniforms, temperature, top_k, top_p, mask, *,
                      check_values: bool = True) -> torch.Tensor:
    check_sample_inputs(logits, uniforms, temperature, top_k, top_p, mask,
                        values=check_values)  # the kernel reads raw pointers
    _check_cpu(logits=logits, uniforms=uniforms, temperature=temperature, top_k=top_k, top_p=top_p, mask=mask)
    return sample_tokens_op(logits, uniforms, temperature.to(torch.float32), as_int32(top_k),
                            top_p.to(torch.float32), mask)


@torch.library.custom_op("rsd_engine::sample_tokens_cpp", mutates_args=(), device_types="cpu")
def sample_tokens_op(logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The op itself; call it through ``sample_tokens(..., backend="cpp")``."""
    logits = _vocab_contiguous(logits)
    uniforms, temperature, top_k, top_p, mask = (t.contiguous() for t in (uniforms, temperature, top_k, top_p, mask))
    token = torch.empty(logits.shape[0], dtype=torch.int64)
    extension().sample_tokens(logits.shape[0], logits.data_ptr(), logits.stride(0), logits.shape[1],
                              LOGIT_DTYPES[logits.dtype], uniforms.data_ptr(), temperature.data_ptr(),
                              top_k.data_ptr(), top_p.data_ptr(), mask.data_ptr(), mask.numel(), token.data_ptr(),
                              torch.get_num_threads())
    return token


@sample_tokens_op.register_fake
def _(logits, *rest):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def rsd_verify_cpp(teacher_logits, student_logits, draft, num_draft, uniforms, params: RowParams, proposal_mask,
                   fallback_mask, *, check_values: bool = True) -> VerifyOutput:
    check_verify_inputs(teacher_logits, student_logits, draft, num_draft, uniforms, params, proposal_mask,
                        fallback_mask, values=check_values)  # the kernel reads raw pointers
    _check_cpu(teacher_logits=teacher_logits, student_logits=student_logits, draft=draft, num_draft=num_draft,
               uniforms=uniforms, proposal_mask=proposal_mask, fallback_mask=fallback_mask)
    if proposal_mask.numel() >= 2**31:
        raise ValueError(f"V={proposal_mask.numel()} ids is beyond what the cpp backend indexes (< 2**31)")
    row = [as_int32(getattr(params, name)) if name in _INT_PARAMS else getattr(params, name).to(torch.float32)
           for name in RowParams._fields]
    return VerifyOutput(*rsd_verify_op(teacher_logits, student_logits, draft, num_draft, uniforms, *row,
                                       proposal_mask, fallback_mask))


@torch.library.custom_op("rsd_engine::rsd_verify_cpp", mutates_args=(), device_types="cpu")
def rsd_verify_op(teacher_logits: torch.Tensor, student_logits: torch.Tensor, draft: torch.Tensor,
                  num_draft: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, threshold: torch.Tensor, check_temperature: torch.Tensor,
                  student_temperature: torch.Tensor, student_top_k: torch.Tensor, student_top_p: torch.Tensor,
                  proposal_trials: torch.Tensor, proposal_mask: torch.Tensor, fallback_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op itself; call it through ``rsd_verify(..., backend="cpp")``, which converts the parameters to
    float32 (int32 for top_k, student_top_k, proposal_trials)."""
    teacher_logits, student_logits, uniforms = (_vocab_contiguous(t) for t in (teacher_logits, student_logits,
                                                                               uniforms))
    draft = draft if draft.shape[-1] <= 1 or draft.stride(-1) == 1 else draft.contiguous()
    row = [p.contiguous() for p in (temperature, top_k, top_p, threshold, check_temperature, student_temperature,
                                    student_top_k, student_top_p, proposal_trials)]
    num_draft, proposal_mask, fallback_mask = (t.contiguous() for t in (num_draft, proposal_mask, fallback_mask))
    B, P = teacher_logits.shape[:2]
    tokens = torch.empty(B, P, dtype=torch.int64)
    num_emitted = torch.empty(B, dtype=torch.int32)
    accepted = torch.empty(B, P, dtype=torch.bool)
    teacher_logprob = torch.empty(B, P, dtype=torch.float32)
    student_logprob = torch.empty(B, P, dtype=torch.float32)
    extension().rsd_verify(
        B, P,
        teacher_logits.data_ptr(), teacher_logits.stride(0), teacher_logits.stride(1), teacher_logits.shape[2],
        LOGIT_DTYPES[teacher_logits.dtype],
        student_logits.data_ptr(), student_logits.stride(0), student_logits.stride(1), student_logits.shape[2],
        LOGIT_DTYPES[student_logits.dtype],
        draft.data_ptr(), draft.stride(0), num_draft.data_ptr(),
        uniforms.data_ptr(), uniforms.stride(0), uniforms.stride(1),
        [NUM_DRAWS, KEEP_DRAW, RESIDUAL_DRAW, FLAG_DRAW], [p.data_ptr() for p in row],
        proposal_mask.data_ptr(), fallback_mask.data_ptr(), proposal_mask.numel(),
        tokens.data_ptr(), num_emitted.data_ptr(), accepted.data_ptr(), teacher_logprob.data_ptr(),
        student_logprob.data_ptr(), torch.get_num_threads())
    return tokens, num_emitted, accepted, teacher_logprob, student_logprob


@rsd_verify_op.register_fake
def _(teacher_logits, *rest):
    B, P = teacher_logits.shape[:2]
    return (teacher_logits.new_empty(B, P, dtype=torch.int64), teacher_logits.new_empty(B, dtype=torch.int32),
            teacher_logits.new_empty(B, P, dtype=torch.bool), teacher_logits.new_empty(B, P, dtype=torch.float32),
            teacher_logits.new_empty(B, P, dtype=torch.float32))
