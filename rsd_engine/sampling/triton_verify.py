"""Triton backends of ``sample_tokens`` and ``rsd_verify`` (kernels/rsd_verify.py): compiled on CUDA
tensors, interpreted on CPU ones (as the Triton ``rsd_sample``; see triton.py). Same arguments and outputs
as the references; no host sync, so a round can sit inside a CUDA graph."""
from __future__ import annotations

import torch

from ..randomness import FLAG_DRAW, KEEP_DRAW, NUM_DRAWS, RESIDUAL_DRAW
from .reference import RowParams
from .triton import INTERPRETER_CONFIG, _int8, _launch_config, _rows, _SplitLaunch, import_kernel
from .verify_reference import VerifyOutput

_kernels = import_kernel("rsd_verify")
_split = import_kernel("rsd_split")
_FLOAT_FIELDS = ("temperature", "top_p", "threshold", "check_temperature", "student_temperature", "student_top_p")


def sample_tokens_triton(logits, uniforms, temperature, top_k, top_p, mask) -> torch.Tensor:
    device = logits.device
    config = _launch_config(device)
    B = logits.shape[0]
    token = torch.empty(B, dtype=torch.int64, device=device)
    if B > 0:
        logits = _rows(logits)
        mask = _int8(mask)
        law = (temperature.to(device, torch.float32).contiguous(), top_k.to(device, torch.int32).contiguous(),
               top_p.to(device, torch.float32).contiguous())
        split = _SplitLaunch(config, B, logits, logits, mask.numel(), mask.numel(), sides=1)
        split.rounds(logits, logits, mask, mask, law[0], law, law)
        _split.sample_final_kernel[(B,)](
            logits, uniforms.float().contiguous(), *law, mask, *split.scratch, token, logits.shape[1], mask.numel(),
            logits.stride(0), split.chunks, split.n_seg, **split.final_constexprs, enable_fp_fusion=False)
    return token


def _last_contiguous(t):
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# rsd_verify still runs the one-program-per-row kernel (kernels/rsd_verify.py) with its own tiles: BLOCK ids per
# streaming step, pivot searches on [NUM_PIVOTS, SEARCH_BLOCK] tiles (wider under the interpreter, which pays per
# operation rather than per element).
VERIFY_CUDA_CONFIG = dict(BLOCK=1024, SEARCH_BLOCK=256, NUM_PIVOTS=16, num_warps=8)
VERIFY_INTERPRETER_CONFIG = dict(BLOCK=4096, SEARCH_BLOCK=1024, NUM_PIVOTS=256)


def rsd_verify_triton(teacher_logits, student_logits, draft, num_draft, uniforms, params: RowParams, proposal_mask,
                      fallback_mask) -> VerifyOutput:
    device = teacher_logits.device
    config = VERIFY_INTERPRETER_CONFIG if _launch_config(device) is INTERPRETER_CONFIG else VERIFY_CUDA_CONFIG
    B, P = teacher_logits.shape[:2]
    tokens = torch.empty(B, P, dtype=torch.int64, device=device)
    num_emitted = torch.empty(B, dtype=torch.int32, device=device)
    accepted = torch.empty(B, P, dtype=torch.int8, device=device)
    teacher_logprob = torch.empty(B, P, dtype=torch.float32, device=device)
    student_logprob = torch.empty(B, P, dtype=torch.float32, device=device)
    if B > 0:
        teacher_logits, student_logits, uniforms = (_last_contiguous(t) for t in (teacher_logits, student_logits,
                                                                                   uniforms))
        draft = draft.contiguous() if draft.numel() else torch.zeros(B, 1, dtype=torch.int64, device=device)
        row_params = [getattr(params, name).to(device, torch.float32 if name in _FLOAT_FIELDS else torch.int32)
                      .contiguous() for name in RowParams._fields]
        _kernels.rsd_verify_kernel[(B,)](
            teacher_logits, student_logits, draft, num_draft.contiguous(), uniforms, *row_params,
            _int8(proposal_mask), _int8(fallback_mask), tokens, num_emitted, accepted, teacher_logprob,
            student_logprob, teacher_logits.shape[2], student_logits.shape[2], proposal_mask.numel(), P,
            teacher_logits.stride(0), teacher_logits.stride(1), student_logits.stride(0), student_logits.stride(1),
            draft.stride(0), uniforms.stride(0), uniforms.stride(1), NUM_DRAWS, KEEP_DRAW, RESIDUAL_DRAW, FLAG_DRAW,
            **config, enable_fp_fusion=False)
    return VerifyOutput(tokens, num_emitted, accepted.view(torch.bool), teacher_logprob, student_logprob)
