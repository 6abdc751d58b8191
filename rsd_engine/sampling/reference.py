"""The RSD step in plain PyTorch: the contract every fused backend is tested against (DESIGN.md §2).

Inputs, for a batch of B rows:
    teacher_logits  [B, Vt]  any float dtype
    student_logits  [B, Vs]  any float dtype
    uniforms        [B, NUM_DRAWS] float32 in (0, 1]; column 0 = fallback draw, column 1+k = proposal k
    params          RowParams, each field [B]
    proposal_mask   [V] bool, V <= min(Vt, Vs): ids the teacher may propose (shared token space)
    fallback_mask   [V] bool: ids the student may write

Law of the emitted token:
    qT = truncate(softmax(lT / temperature) on proposal_mask, top_k, top_p)   (temperature 0: argmax)
    accept x ~ qT iff softmax(lS / check_temperature)[x] >= threshold, up to proposal_trials tries
    otherwise y ~ qS = truncate(softmax(lS / student_temperature) on fallback_mask, student_top_k, student_top_p)

Truncation: top-k keeps the k most probable (ties by lower id); top-p then keeps token i iff the mass
ranked before it is < top_p times the mass top-k kept (so at least one token; top_p = 1 keeps all).
A draw with uniform u picks the first id, in id order, whose cumulative kept mass is >= u * total.

Outputs: token [B] int64, accepted [B] bool, and the emitted token's raw log-probabilities
(log_softmax at temperature 1 over the whole row) teacher_logprob [B], student_logprob [B] float32.
A row whose teacher logits hold NaN or +inf gets token -1 (student: -2) instead of a garbage token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

TEACHER_NONFINITE = -1
STUDENT_NONFINITE = -2
# What a flagged (negative) token means, for the messages of requests that end with it.
FLAG_REASONS: dict[int, str] = {
    TEACHER_NONFINITE: "the teacher's logits hold NaN or +inf",
    STUDENT_NONFINITE: "the student's logits hold NaN or +inf",
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
    """Unnormalised truncated distribution [B, V] over the first V = mask.numel() ids."""
    logits = logits[:, : mask.numel()].float()
    masked = logits.masked_fill(~mask, float("-inf"))
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(masked / safe_t[:, None], dim=-1)

    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    keep = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
    sorted_p = sorted_p * keep
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    total = sorted_p.sum(dim=-1, keepdim=True)
    keep &= (top_p[:, None] >= 1) | (mass_before < top_p[:, None] * total)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)

    one_hot = torch.zeros_like(probs).scatter(-1, masked.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, kept)


def inverse_cdf(weights, u):
    """First id whose cumulative weight is >= u * total; weights [B, V] >= 0, u [B] in (0, 1]."""
    cdf = torch.cumsum(weights, dim=-1)
    target = u[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=False).squeeze(-1)
    return idx.clamp_max(weights.shape[-1] - 1)


def rsd_sample_reference(teacher_logits, student_logits, uniforms, params: RowParams, proposal_mask,
                         fallback_mask) -> SampleOutput:
    teacher_logits = teacher_logits.float()
    student_logits = student_logits.float()
    q_teacher = truncated_probs(teacher_logits, params.temperature, params.top_k, params.top_p, proposal_mask)
    check_probs = torch.softmax(student_logits / params.check_temperature[:, None], dim=-1)

    batch = torch.arange(teacher_logits.shape[0], device=teacher_logits.device)
    token = torch.zeros_like(batch)
    accepted = torch.zeros_like(batch, dtype=torch.bool)
    for k in range(uniforms.shape[1] - 1):
        proposal = inverse_cdf(q_teacher, uniforms[:, 1 + k])
        ok = (check_probs[batch, proposal] >= params.threshold) & (k < params.proposal_trials) & ~accepted
        token = torch.where(ok, proposal, token)
        accepted |= ok

    q_student = truncated_probs(student_logits, params.student_temperature, params.student_top_k,
                                params.student_top_p, fallback_mask)
    fallback = inverse_cdf(q_student, uniforms[:, 0])
    token = torch.where(accepted, token, fallback)

    teacher_logprob = torch.log_softmax(teacher_logits, dim=-1)[batch, token]
    student_logprob = torch.log_softmax(student_logits, dim=-1)[batch, token]

    def bad(logits):
        return (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)

    token = torch.where(bad(student_logits), STUDENT_NONFINITE, token)
    token = torch.where(bad(teacher_logits), TEACHER_NONFINITE, token)
    return SampleOutput(token, accepted, teacher_logprob, student_logprob)
