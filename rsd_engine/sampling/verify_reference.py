"""The verify step of exact speculative RSD (DESIGN.md §8, steps 3-4) in plain PyTorch: the contract of
``rsd_verify`` on every backend.

Inputs, for a batch of B rows and a round of G drafts:
    teacher_logits  [B, G+1, Vt]  position i holds the logits that predict the round's i-th token
    student_logits  [B, G+1, Vs]
    draft           [B, G] int64: draft[:, i] was drawn from the student's fallback law qS_i at position i
    num_draft       [B] int32 in [0, G]: how many drafts of the row to verify (values outside are clamped)
    uniforms        [B, G+1, D] float32 in (0, 1], D >= NUM_ROUND_DRAWS; columns as in randomness.py
    params          RowParams, each [B]; proposal_mask, fallback_mask [V] bool, as for ``rsd_sample``

Laws at position i (reference.py has the truncation rules): qT_i, the teacher's proposal law; qS_i, the
student's fallback law; ok_i(y) = [softmax(lS_i / check_temperature)[y] >= threshold]; the RSD law
    Q_i = qT_i·ok_i·c_i + r_i^K·qS_i,  r_i = sum_z qT_i(z)·(1 - ok_i(z)),  c_i = 1 + r_i + ... + r_i^(K-1)
with K = proposal_trials (a row whose mask leaves the teacher no finite logit has qT = 0, r = 1).

The round, per row, for i = 0, 1, ...:
  * i < num_draft: keep x = draft[:, i] iff Q_i(x) > 0 and u_keep·qS_i(x) <= Q_i(x) (probability
    min(1, Q_i(x)/qS_i(x))); else emit y ~ norm(max(0, Q_i - qS_i)) by inverse CDF with u_residual and end
    the round (if rounding leaves that residual without mass, y is drawn from Q_i instead). The emitted
    token's `accepted` flag is drawn from its posterior P(teacher | y) = qT_i(y)·ok_i(y)·c_i / Q_i(y): true iff
    u_flag·Q_i(y) <= qT_i(y)·ok_i(y)·c_i and the right side is > 0. A draft id outside [0, V) is rejected.
  * i == num_draft (every draft kept): the bonus token, drawn exactly as ``rsd_sample`` draws a plain step
    from this position's [fallback, proposal 0..K-1] columns, with its own `accepted`; the round ends.
Every emitted token thus follows Q_i given the tokens before it, and (token, accepted) has plain RSD's
joint law. Arithmetic on Q runs in float64 from the float32 truncated laws.

Outputs (VerifyOutput): tokens [B, G+1] int64, num_emitted [B] int32 in [1, num_draft + 1], accepted
[B, G+1] bool, teacher_logprob / student_logprob [B, G+1] float32 (raw log_softmax at temperature 1 of
each model's row at that position, of the emitted token). Positions past num_emitted are filled with
token -1, accepted False and NaN log-probs; read only the first num_emitted entries of a row.
Flags, as ``rsd_sample``'s: an emitted position whose teacher row holds NaN/+inf gets token -1
(TEACHER_NONFINITE), else whose student row does -2 (STUDENT_NONFINITE); a draft position whose fallback
mask leaves the student no finite logit (it cannot have drafted there) gets -3 (NO_ALLOWED_TOKEN), and
the bonus position gets -3 where rsd_sample would. The round ends at a flag, which is its last token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..randomness import FLAG_DRAW, KEEP_DRAW, NUM_DRAWS, RESIDUAL_DRAW
from .reference import NO_ALLOWED_TOKEN, STUDENT_NONFINITE, TEACHER_NONFINITE, RowParams, check_probs, inverse_cdf, \
    rsd_sample_reference, truncated_probs
from .sample_reference import nonfinite_rows


class VerifyOutput(NamedTuple):
    tokens: torch.Tensor  # [B, G+1] int64, -1 past num_emitted
    num_emitted: torch.Tensor  # [B] int32
    accepted: torch.Tensor  # [B, G+1] bool
    teacher_logprob: torch.Tensor  # [B, G+1] float32
    student_logprob: torch.Tensor  # [B, G+1] float32


def _normalised(weights):
    """weights [B, V] >= 0 (NaN where the row had no mass) -> float64 law, all zero where no mass."""
    weights = torch.nan_to_num(weights.double(), nan=0.0)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def position_laws(teacher_logits, student_logits, params: RowParams, proposal_mask, fallback_mask):
    """(Q, teacher part qT·ok·c, qS) [B, V] float64 at one position (DESIGN.md §2 with K trials)."""
    V = proposal_mask.numel()
    q_teacher = _normalised(truncated_probs(teacher_logits, params.temperature, params.top_k, params.top_p,
                                            proposal_mask))
    q_student = _normalised(truncated_probs(student_logits, params.student_temperature, params.student_top_k,
                                            params.student_top_p, fallback_mask))
    # The same check decision as rsd_sample's (float64), so the bonus token and the drafts agree on ok.
    ok = check_probs(student_logits, params.check_temperature)[:, :V] >= params.threshold.double()[:, None]
    has_teacher = q_teacher.sum(dim=-1) > 0
    r = torch.where(has_teacher, (q_teacher * ~ok).sum(dim=-1), 1.0)
    # K as the bonus position's rsd_sample takes it, at most NUM_DRAWS - 1: one law for a whole round
    trials = params.proposal_trials.clamp(max=NUM_DRAWS - 1).to(torch.float64)
    r_k = r ** trials
    c = torch.where(r < 1, (1 - r_k) / (1 - r).clamp_min(1e-300), trials)  # 1 + r + ... + r^(K-1)
    teacher_part = q_teacher * ok * c[:, None]
    return teacher_part + r_k[:, None] * q_student, teacher_part, q_student


def rsd_verify_reference(teacher_logits, student_logits, draft, num_draft, uniforms, params: RowParams,
                         proposal_mask, fallback_mask) -> VerifyOutput:
    B, P, _ = teacher_logits.shape
    V = proposal_mask.numel()
    device = teacher_logits.device
    rows = torch.arange(B, device=device)
    n = num_draft.to(torch.int64).clamp(0, P - 1)
    tokens = torch.full((B, P), -1, dtype=torch.int64, device=device)
    accepted = torch.zeros(B, P, dtype=torch.bool, device=device)
    teacher_logprob = torch.full((B, P), float("nan"), device=device)
    student_logprob = torch.full((B, P), float("nan"), device=device)
    num_emitted = torch.zeros(B, dtype=torch.int32, device=device)
    open_ = torch.ones(B, dtype=torch.bool, device=device)  # the round has not ended yet

    for i in range(P):
        lT, lS, u = teacher_logits[:, i].float(), student_logits[:, i].float(), uniforms[:, i]
        bonus = rsd_sample_reference(lT, lS, u[:, :NUM_DRAWS], params, proposal_mask, fallback_mask)

        Q, teacher_part, q_student = position_laws(lT, lS, params, proposal_mask, fallback_mask)
        x = draft[:, i] if i < P - 1 else torch.zeros(B, dtype=torch.int64, device=device)
        in_range = (x >= 0) & (x < V)
        x = x.clamp(0, V - 1)
        q_x, qs_x = Q[rows, x] * in_range, q_student[rows, x]
        keep = (q_x > 0) & (u[:, KEEP_DRAW].double() * qs_x <= q_x)
        residual = (Q - q_student).clamp_min(0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, Q)
        y = torch.where(keep, x, inverse_cdf(residual, u[:, RESIDUAL_DRAW].double()))
        flag = (teacher_part[rows, y] > 0) & (u[:, FLAG_DRAW].double() * Q[rows, y] <= teacher_part[rows, y])
        empty_fallback = q_student.sum(dim=-1) <= 0
        y = torch.where(empty_fallback, NO_ALLOWED_TOKEN, y)
        y = torch.where(nonfinite_rows(lS), STUDENT_NONFINITE, y)
        y = torch.where(nonfinite_rows(lT), TEACHER_NONFINITE, y)

        drafting = i < n
        token = torch.where(drafting, y, bonus.token)
        flag = torch.where(drafting, flag, bonus.accepted) & (token >= 0)
        safe = token.clamp_min(0)
        tokens[:, i] = torch.where(open_, token, -1)
        accepted[:, i] = open_ & flag
        emitted_ok = open_ & (token >= 0)
        teacher_logprob[:, i] = torch.where(emitted_ok, torch.log_softmax(lT, dim=-1)[rows, safe], float("nan"))
        student_logprob[:, i] = torch.where(emitted_ok, torch.log_softmax(lS, dim=-1)[rows, safe], float("nan"))
        num_emitted = torch.where(open_, i + 1, num_emitted)
        open_ = open_ & drafting & keep & (token >= 0)
    return VerifyOutput(tokens, num_emitted, accepted, teacher_logprob, student_logprob)
