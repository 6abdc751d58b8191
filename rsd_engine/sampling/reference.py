"""The RSD step in plain PyTorch: the contract every fused backend is tested against (DESIGN.md §2).

Inputs, for a batch of B rows:
    teacher_logits  [B, Vt]  any float dtype, read as float32; any strides
    student_logits  [B, Vs]  any float dtype, read as float32; any strides
    uniforms        [B, D] float32 in [0, 1], D >= 1; column 0 = fallback draw, column 1+k = proposal k
    params          RowParams, each field [B]
    proposal_mask   [V] bool, V <= min(Vt, Vs): ids the teacher may propose (shared token space)
    fallback_mask   [V] bool: ids the student may write

Law of the emitted token:
    qT = truncate(softmax(lT / temperature) on proposal_mask, top_k, top_p)   (temperature 0: argmax)
    accept x ~ qT iff pC(x) = softmax(lS / check_temperature)[x] >= threshold, for up to
    min(proposal_trials, D - 1) proposals
    otherwise y ~ qS = truncate(softmax(lS / student_temperature) on fallback_mask, student_top_k, student_top_p)

Arithmetic, as exact as the best backend and stated so that every backend can follow it:
- Weights: w_i = exp((l_i - m) * (1 / t)) in float32, m the largest allowed logit, 1 / t rounded to float32
  once. Subtracting first keeps the result finite and exact near the maximum: l / t overflows once
  |l| > FLT_MAX * t, and at t = 1e-6 it rounds away the ulp-sized differences that decide the law.
- Masses (top-p sums, the draw's cumulative sums) add the float32 weights in float64.
- The check runs in float64 from the float32 logits: pC(x) = exp((lS[x] - max lS) / tc) / sum_j exp(
  (lS[j] - max lS) / tc), compared with the float32 threshold widened exactly. So pC = 1/3 is rejected at
  threshold = float32(1/3) (which is slightly above 1/3), as exact arithmetic says.

Truncation: top-k keeps the k largest weights (ties by lower id); top-p then keeps id i iff the mass
ranked before it is < top_p times the mass top-k kept (so at least one id; top_p = 1 keeps all). Logits
that float32 weights make equal rank by id here; a backend ranking by logit may differ only there.
A draw with uniform u picks the first id, in id order, with weight > 0 whose cumulative kept mass is
>= u * total; u = 0 therefore picks the first kept id, and if rounding leaves u * total above the sum,
the last kept id.

Outputs: token [B] int64, accepted [B] bool, and the emitted token's raw log-probabilities
(log_softmax at temperature 1 over the whole row) teacher_logprob [B], student_logprob [B] float32.

Degenerate rows:
- No allowed finite teacher logit (every proposal_mask id is -inf, or the mask has no True entry): qT is
  empty, no proposal is drawn, and the student writes the token (accepted False).
- The student must write the token but no fallback_mask id has a finite logit: token NO_ALLOWED_TOKEN
  (-3). A row that accepts a proposal never needs qS and is not flagged.
- NaN or +inf anywhere in a row (padding past V included): token TEACHER_NONFINITE (-1), else
  STUDENT_NONFINITE (-2), whatever the rest of the row holds. -inf is a legal logit (a banned id).
Flagged rows (token < 0, precedence -1, -2, -3) have accepted False and NaN log-probs;
FLAG_REASONS says in words what each flag means.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

TEACHER_NONFINITE = -1
STUDENT_NONFINITE = -2
NO_ALLOWED_TOKEN = -3
# What a flagged (negative) token means, for the messages of requests that end with it.
FLAG_REASONS: dict[int, str] = {
    # sample_tokens (one model) flags its rows with -1 too: SAMPLE_FLAGGED in sample_reference.py.
    TEACHER_NONFINITE: "the teacher's logits hold NaN or +inf (or, from sample_tokens, the one model's logits do, "
                       "or leave no id it may draw)",
    STUDENT_NONFINITE: "the student's logits hold NaN or +inf",
    NO_ALLOWED_TOKEN: "the student had to write the token, but every id it may write (the fallback mask) "
                      "has logit -inf",
}


class RowParams(NamedTuple):
    """Per-row sampling parameters as tensors, each [B]."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int32, 0 = off
    top_p: torch.Tensor  # float32
    threshold: torch.Tensor  # float32
    check_temperature: torch.Tensor  # float32
    student_temperature: torch.Tensor  # float32
    student_top_k: torch.Tensor  # int32
    student_top_p: torch.Tensor  # float32
    proposal_trials: torch.Tensor  # int32, >= 1


class SampleOutput(NamedTuple):
    token: torch.Tensor  # [B] int64
    accepted: torch.Tensor  # [B] bool
    teacher_logprob: torch.Tensor  # [B] float32
    student_logprob: torch.Tensor  # [B] float32


def truncated_probs(logits, temperature, top_k, top_p, mask):
    """Unnormalised truncated distribution [B, V] over the first V = mask.numel() ids: the float32 weights
    of the contract, widened to float64; all zero on a row with no allowed finite logit."""
    logits = logits[:, : mask.numel()].float()
    masked = logits.masked_fill(~mask, float("-inf"))
    top = masked.amax(dim=-1, keepdim=True)
    alive = top > float("-inf")
    greedy = temperature == 0
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature).float()
    shift = torch.where(alive, top, 0.0)  # a dead row stays all -inf rather than NaN
    weights = torch.exp((masked - shift) * inv_t[:, None])

    sorted_w, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    sorted_w = sorted_w.double()
    rank = torch.arange(weights.shape[-1], device=weights.device)
    keep = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
    sorted_w = sorted_w * keep
    mass_before = torch.cumsum(sorted_w, dim=-1) - sorted_w
    total = sorted_w.sum(dim=-1, keepdim=True)
    # At least one id (DESIGN §2). top_p = 0 is out of range (checks.py refuses it where it can read it; a CUDA tensor
    # goes unread): it keeps the first, as the C++ op does.
    keep &= (top_p[:, None] >= 1) | (mass_before < top_p.double()[:, None] * total) | (rank[None, :] == 0)
    kept = torch.zeros_like(sorted_w).scatter(-1, order, sorted_w * keep)

    one_hot = torch.zeros_like(kept).scatter(-1, masked.argmax(dim=-1, keepdim=True), 1.0) * alive
    return torch.where(greedy[:, None], one_hot, kept)


def inverse_cdf(weights, u):
    """First id with weight > 0 whose cumulative weight is >= u * total; -1 on a row with no weight.
    weights [B, V] >= 0, u [B] in [0, 1]."""
    cdf = torch.cumsum(weights.double(), dim=-1)
    # Aiming at the smallest positive mass instead of 0 makes u = 0 land on an id with weight too. In
    # float64, u * total never exceeds the sum (u <= 1), so only a row without weight finds no id.
    target = (u.double()[:, None] * cdf[:, -1:]).clamp_min(torch.finfo(torch.float64).tiny)
    idx = torch.searchsorted(cdf, target).squeeze(-1)
    return torch.where(idx < weights.shape[-1], idx, -1)


def check_probs(student_logits, check_temperature):
    """softmax(lS / check_temperature) in float64, as (x - max) / tc: the probabilities the threshold judges."""
    x = student_logits.double()
    return torch.softmax((x - x.amax(dim=-1, keepdim=True)) / check_temperature.double()[:, None], dim=-1)


def rsd_sample_reference(teacher_logits, student_logits, uniforms, params: RowParams, proposal_mask,
                         fallback_mask) -> SampleOutput:
    if uniforms.dim() != 2 or uniforms.shape[0] != teacher_logits.shape[0] or uniforms.shape[1] < 1:
        raise ValueError(f"uniforms must be [B={teacher_logits.shape[0]}, 1 + max proposals] (see "
                         f"randomness.step_uniforms), got shape {tuple(uniforms.shape)}")
    teacher_logits = teacher_logits.float()
    student_logits = student_logits.float()
    q_teacher = truncated_probs(teacher_logits, params.temperature, params.top_k, params.top_p, proposal_mask)
    p_check = check_probs(student_logits, params.check_temperature)
    threshold = params.threshold.double()

    batch = torch.arange(teacher_logits.shape[0], device=teacher_logits.device)
    token = torch.full_like(batch, -1)
    accepted = torch.zeros_like(batch, dtype=torch.bool)
    for k in range(uniforms.shape[1] - 1):
        proposal = inverse_cdf(q_teacher, uniforms[:, 1 + k])  # -1 when qT is empty
        ok = ((proposal >= 0) & (p_check[batch, proposal.clamp_min(0)] >= threshold) & (k < params.proposal_trials)
              & ~accepted)
        token = torch.where(ok, proposal, token)
        accepted |= ok

    q_student = truncated_probs(student_logits, params.student_temperature, params.student_top_k,
                                params.student_top_p, fallback_mask)
    fallback = inverse_cdf(q_student, uniforms[:, 0])
    token = torch.where(accepted, token, torch.where(fallback >= 0, fallback, NO_ALLOWED_TOKEN))

    def bad(logits):
        return (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)

    token = torch.where(bad(student_logits), STUDENT_NONFINITE, token)
    token = torch.where(bad(teacher_logits), TEACHER_NONFINITE, token)
    flagged = token < 0
    emitted = token.clamp_min(0)
    teacher_logprob = torch.log_softmax(teacher_logits, dim=-1)[batch, emitted].masked_fill(flagged, float("nan"))
    student_logprob = torch.log_softmax(student_logits, dim=-1)[batch, emitted].masked_fill(flagged, float("nan"))
    return SampleOutput(token, accepted & ~flagged, teacher_logprob, student_logprob)
