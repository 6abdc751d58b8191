"""Triton backends of ``sample_tokens`` and ``rsd_verify`` (kernels/rsd_verify.py): compiled on CUDA
tensors, interpreted on CPU ones (as the Triton ``rsd_sample``; see triton.py). Same arguments and outputs
as the references; no host sync, so a round can sit inside a CUDA graph."""
from __future__ import annotations

import torch

from ..randomness import FLAG_DRAW, KEEP_DRAW, NUM_DRAWS, RESIDUAL_DRAW
from .checks import as_int32, check_sample_inputs, check_verify_inputs
from .reference import RowParams
from .triton import _int8, _launch_config, _rows, _SplitLaunch, chunks_for, import_kernel
from .verify_reference import VerifyOutput

_kernels = import_kernel("rsd_verify")
_split = import_kernel("rsd_split")
_FLOAT_FIELDS = ("temperature", "top_p", "threshold", "check_temperature", "student_temperature", "student_top_p")


def sample_tokens_triton(logits, uniforms, temperature, top_k, top_p, mask, *,
                         check_values: bool = True) -> torch.Tensor:
    check_sample_inputs(logits, uniforms, temperature, top_k, top_p, mask,
                        values=check_values)  # as the dispatcher: kernels read past a wrong shape
    device = logits.device
    config = _launch_config(device)
    B = logits.shape[0]
    token = torch.empty(B, dtype=torch.int64, device=device)
    if B > 0:
        logits = _rows(logits)
        mask = _int8(mask)
        law = (temperature.to(device, torch.float32).contiguous(), as_int32(top_k.to(device)).contiguous(),
               top_p.to(device, torch.float32).contiguous())
        split = _SplitLaunch(config, B, logits, logits, mask.numel(), mask.numel(), sides=1)
        split.rounds(logits, logits, mask, mask, law[0], law, law)
        _split.sample_final_kernel[(B,)](
            logits, uniforms.float().contiguous(), *law, mask, *split.scratch, token, logits.shape[1], mask.numel(),
            logits.stride(0), split.n_seg, **{k: v for k, v in split.final_constexprs.items() if k != "CP2"},
            **split.pdl, enable_fp_fusion=False)
    return token


def _last_contiguous(t):
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def rsd_verify_triton(teacher_logits, student_logits, draft, num_draft, uniforms, params: RowParams, proposal_mask,
                      fallback_mask, *, check_values: bool = True) -> VerifyOutput:
    """kernels/rsd_verify.py: rsd_split's stats and radix rounds over the B * P (row, position) pairs, then the
    cuts, the failed masses and the residual masses per (position, chunk), then one program per row picks the
    emitted prefix: eight launches whatever G."""
    check_verify_inputs(teacher_logits, student_logits, draft, num_draft, uniforms, params, proposal_mask,
                        fallback_mask, values=check_values)  # as the dispatcher: kernels read past a wrong shape
    device = teacher_logits.device
    config = _launch_config(device)
    B, P = teacher_logits.shape[:2]
    tokens = torch.empty(B, P, dtype=torch.int64, device=device)
    num_emitted = torch.empty(B, dtype=torch.int32, device=device)
    accepted = torch.empty(B, P, dtype=torch.int8, device=device)
    teacher_logprob = torch.empty(B, P, dtype=torch.float32, device=device)
    student_logprob = torch.empty(B, P, dtype=torch.float32, device=device)
    if B > 0:
        R = B * P
        teacher, student = (_last_contiguous(t).reshape(R, t.shape[2]) for t in (teacher_logits, student_logits))
        uniforms = _last_contiguous(uniforms.float()).reshape(R, uniforms.shape[2])
        draft = draft.contiguous() if draft.numel() else torch.zeros(B, 1, dtype=torch.int64, device=device)
        num_draft = num_draft.to(device, torch.int32).contiguous()
        # The split launches see B * P independent rows, each (row, position) reading its row's parameters.
        row_params = [(getattr(params, name).to(device, torch.float32) if name in _FLOAT_FIELDS
                       else as_int32(getattr(params, name).to(device))).contiguous() for name in RowParams._fields]
        sides = (*row_params[:3], *row_params[5:9])  # teacher's law, student's law, trials
        proposal_mask, fallback_mask = _int8(proposal_mask), _int8(fallback_mask)
        V = proposal_mask.numel()
        # The split rounds: at least two programs per (row, position) and side, as measured on the card (verify's
        # B * P rows reach the table's one-program-per-row entry at B = 13 already).
        chunks = max(2, chunks_for(R, -(-max(teacher.shape[1], student.shape[1]) // config["SEG"]), config))
        split = _SplitLaunch({**config, "chunks": chunks}, R, teacher, student, V, fallback_mask.numel(), sides=2,
                             param_div=P)
        split.rounds(teacher, student, proposal_mask, fallback_mask, row_params[4], row_params[:3], row_params[5:8])
        # failed_kernel and residual_kernel: one program per (row, position) and segment. Their programs share
        # nothing (each stores its segment's sums), so the widest split costs no combining: one dependent step
        # per side and the fewest exchanges per program, whatever B.
        n_seg, chunks = split.n_seg, split.n_seg
        f64 = dict(dtype=torch.float64, device=device)
        cut = (torch.empty(R, 2, dtype=torch.int64, device=device), torch.empty(R, 2, dtype=torch.int32, device=device))
        total, at = torch.empty(R, 2, **f64), torch.empty(R, 3, **f64)
        failed = torch.empty(R, 3, n_seg, **f64)
        residual, q_mass = torch.empty(R, n_seg, **f64), torch.empty(R, n_seg, **f64)
        keep = torch.empty(R, _kernels.KEEP_SLOTS.value, **f64)
        constexprs = split.final_constexprs
        pick = {k: v for k, v in constexprs.items() if k not in ("SG", "SEARCH_BLOCK", "NUM_PIVOTS", "CP2")}
        shape = (V, P, teacher.stride(0), student.stride(0), draft.stride(0))
        _kernels.law_kernel[(R, 2)](
            teacher, student, num_draft, *sides, proposal_mask, fallback_mask, *split.scratch, *cut, total, at,
            teacher.shape[1], student.shape[1], V, P, teacher.stride(0), student.stride(0), n_seg,
            **{k: v for k, v in constexprs.items() if k not in ("NSP2", "CP2")}, **split.pdl, enable_fp_fusion=False)
        _kernels.failed_kernel[(R, chunks)](
            teacher, student, draft, num_draft, *row_params, proposal_mask, fallback_mask, split.walk, split.kept[1],
            *cut, failed, at, *shape, 1, n_seg, SEG=split.seg, TILE=split.tile, **split.warps, **split.pdl,
            enable_fp_fusion=False)
        _kernels.residual_kernel[(R, chunks)](
            teacher, student, draft, num_draft, uniforms, *row_params, proposal_mask, fallback_mask, split.walk,
            split.kept[1], *cut, failed, at, residual, q_mass, keep, *shape, uniforms.stride(0), KEEP_DRAW, 1, n_seg,
            **pick, TILE=split.tile, **split.pdl, enable_fp_fusion=False)
        _kernels.pick_kernel[(B,)](
            teacher, student, draft, num_draft, uniforms, *row_params, proposal_mask, fallback_mask, split.walk,
            *split.kept, *cut, total, residual, q_mass, keep, tokens, num_emitted, accepted, teacher_logprob,
            student_logprob, *shape, uniforms.stride(0), NUM_DRAWS, RESIDUAL_DRAW, FLAG_DRAW, n_seg, **pick,
            TILE=split.tile, **split.pdl, enable_fp_fusion=False)
    return VerifyOutput(tokens, num_emitted, accepted.view(torch.bool), teacher_logprob, student_logprob)
