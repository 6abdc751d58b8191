"""A decode step's last work in one launch, on CUDA inside the captured step; the engine's torch ops are the
reference and the CPU path.

advance_pack_kernel, the plain step: each row moves on by its sampled token (Engine._advance) and the step's
outputs are packed into the state's float64 [B, 4] buffer (step.pack_outputs); twelve small kernels before.
A flagged row (token < 0) reads token 0 for its advance, as the torch ops' clamp does, and keeps its negative
token in the packed outputs; a padding row (slot = the scratch slot) keeps its positions and step counter.

round_advance_pack_kernel, a speculative round: each row takes its emitted run up to and including its first
mapped token, sizes its next round's num_draft (SpeculativeDecoder._advance) and packs [num_emitted, tokens,
accepted, teacher and student log-probs] into the [B, 1 + 4W] buffer; about twenty small kernels before."""
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


@triton.jit
def round_advance_pack_kernel(
    num_emitted_ptr,  # [B] int32: tokens the round emitted per row (rsd_verify)
    tokens_ptr, accepted_ptr, teacher_logprob_ptr, student_logprob_ptr,  # [B, W] int64, int8, fp32, fp32 (contiguous)
    mapped_ptr,  # [V] int8: a student token that stands for several teacher tokens (the round is cut after it)
    student_tokens_ptr, teacher_tokens_ptr, student_pos_ptr, teacher_pos_ptr, steps_ptr,  # [B] int64, in place
    num_draft_ptr,  # [B] int32, in place: the next round's drafts
    max_new_tokens_ptr,  # [B] int64
    slots_ptr,  # [B] int64 (HAS_SLOTS)
    teacher_next_ptr, teacher_advance_ptr,  # [V] int64: a student token's last teacher piece, its piece count
    out_ptr,  # [B, 1 + 4W] float64, row stride out_stride
    n, out_stride, scratch_slot, max_seq_len, draft_tokens,
    W: tl.constexpr, WP2: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    j = tl.arange(0, WP2)
    cell = ok[:, None] & (j < W)[None, :]
    at = i.to(tl.int64)[:, None] * W + j[None, :]
    emitted = tl.load(num_emitted_ptr + i, mask=ok, other=0).to(tl.int64)
    raw = tl.load(tokens_ptr + at, mask=cell, other=0)
    tokens = tl.maximum(raw, 0)
    mapped = (tl.load(mapped_ptr + tokens, mask=cell, other=0) != 0) & (j[None, :] < emitted[:, None])
    first_mapped = tl.min(tl.where(mapped, j[None, :], W), axis=1).to(tl.int64)
    count = tl.minimum(emitted, first_mapped + 1)
    if HAS_SLOTS:
        count = tl.where(tl.load(slots_ptr + i, mask=ok, other=scratch_slot) != scratch_slot, count, 0)
    moved = count > 0
    last_at = tl.maximum(count - 1, 0)
    last = tl.sum(tl.where(j[None, :] == last_at[:, None], tokens, 0), axis=1)
    student_tokens = tl.load(student_tokens_ptr + i, mask=ok, other=0)
    teacher_tokens = tl.load(teacher_tokens_ptr + i, mask=ok, other=0)
    tl.store(student_tokens_ptr + i, tl.where(moved, last, student_tokens), mask=ok)
    teacher_next = tl.load(teacher_next_ptr + last, mask=ok, other=0)
    tl.store(teacher_tokens_ptr + i, tl.where(moved, teacher_next, teacher_tokens), mask=ok)
    student_pos = tl.load(student_pos_ptr + i, mask=ok, other=0) + count
    advance = tl.where(moved, count - 1 + tl.load(teacher_advance_ptr + last, mask=ok, other=0), 0)
    teacher_pos = tl.load(teacher_pos_ptr + i, mask=ok, other=0) + advance
    steps = tl.load(steps_ptr + i, mask=ok, other=0) + count
    tl.store(student_pos_ptr + i, student_pos, mask=ok)
    tl.store(teacher_pos_ptr + i, teacher_pos, mask=ok)
    tl.store(steps_ptr + i, steps, mask=ok)
    room = tl.minimum(tl.load(max_new_tokens_ptr + i, mask=ok, other=0) - steps,
                      max_seq_len - 1 - tl.maximum(student_pos, teacher_pos))
    tl.store(num_draft_ptr + i, tl.minimum(tl.maximum(room - 1, 0), draft_tokens).to(tl.int32), mask=ok)
    row = out_ptr + i.to(tl.int64) * out_stride
    tl.store(row, emitted.to(tl.float64), mask=ok)
    col = row[:, None] + 1 + j[None, :]
    tl.store(col, raw.to(tl.float64), mask=cell)
    tl.store(col + W, tl.load(accepted_ptr + at, mask=cell, other=0).to(tl.float64), mask=cell)
    tl.store(col + 2 * W, tl.load(teacher_logprob_ptr + at, mask=cell, other=0.0).to(tl.float64), mask=cell)
    tl.store(col + 3 * W, tl.load(student_logprob_ptr + at, mask=cell, other=0.0).to(tl.float64), mask=cell)
