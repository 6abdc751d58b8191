"""The plain decode step's last work in one launch: each row moves on by its sampled token (Engine._advance)
and the step's outputs are packed into the state's float64 [B, 4] buffer (step.pack_outputs). On CUDA, inside
the captured step; the engine's torch ops (twelve small kernels) are the reference and the CPU path.

A flagged row (token < 0) reads token 0 for its advance, as the torch ops' clamp does, and keeps its negative
token in the packed outputs; a padding row (slot = the scratch slot) keeps its positions and step counter."""
import triton
import triton.language as tl


@triton.jit
def advance_pack_kernel(
    token_ptr,  # [B] int64: the sampled tokens (< 0 where the sampler flagged the row)
    accepted_ptr,  # [B] int8 (a bool tensor's bytes)
    teacher_logprob_ptr, student_logprob_ptr,  # [B] fp32
    student_tokens_ptr, teacher_tokens_ptr, student_pos_ptr, teacher_pos_ptr, steps_ptr,  # [B] int64, in place
    slots_ptr,  # [B] int64 (HAS_SLOTS)
    teacher_next_ptr, teacher_advance_ptr,  # [V] int64: a student token's last teacher piece, its piece count
    out_ptr,  # [B, 4] float64, row stride out_stride: token, accepted, teacher and student log-probs
    n, out_stride, scratch_slot,
    HAS_SLOTS: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    token = tl.load(token_ptr + i, mask=ok, other=0)
    safe = tl.maximum(token, 0)
    if HAS_SLOTS:
        live = (tl.load(slots_ptr + i, mask=ok, other=scratch_slot) != scratch_slot).to(tl.int64)
    else:
        live = tl.full((BLOCK,), 1, tl.int64)
    tl.store(student_tokens_ptr + i, safe, mask=ok)
    tl.store(student_pos_ptr + i, tl.load(student_pos_ptr + i, mask=ok, other=0) + live, mask=ok)
    tl.store(steps_ptr + i, tl.load(steps_ptr + i, mask=ok, other=0) + live, mask=ok)
    tl.store(teacher_tokens_ptr + i, tl.load(teacher_next_ptr + safe, mask=ok, other=0), mask=ok)
    advance = tl.load(teacher_advance_ptr + safe, mask=ok, other=0) * live
    tl.store(teacher_pos_ptr + i, tl.load(teacher_pos_ptr + i, mask=ok, other=0) + advance, mask=ok)
    row = out_ptr + i.to(tl.int64) * out_stride
    tl.store(row + 0, token.to(tl.float64), mask=ok)
    tl.store(row + 1, tl.load(accepted_ptr + i, mask=ok, other=0).to(tl.float64), mask=ok)
    tl.store(row + 2, tl.load(teacher_logprob_ptr + i, mask=ok, other=0.0).to(tl.float64), mask=ok)
    tl.store(row + 3, tl.load(student_logprob_ptr + i, mask=ok, other=0.0).to(tl.float64), mask=ok)
