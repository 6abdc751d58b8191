"""Teacher forcing: the log-probability of every token of a sequence given the tokens before it."""
from __future__ import annotations

import torch

from .results import ScoreResult

CHUNK = 512  # positions per forward: bounds the [chunk, vocab] logits held at once


@torch.inference_mode()
def teacher_forced_logprobs(model, cache, seq: list[int]) -> list[float]:
    """``out[q] = log p(seq[q + 1] | seq[: q + 1])`` under ``model``, using slot 0 of ``cache``."""
    device = model.device
    slot = torch.zeros(1, dtype=torch.long, device=device)
    out: list[float] = []
    for start in range(0, len(seq) - 1, CHUNK):
        chunk = seq[start: start + CHUNK]
        targets = torch.tensor(seq[start + 1: start + len(chunk) + 1], device=device)
        positions = torch.arange(start, start + len(chunk), device=device)[None]
        hidden = model(torch.tensor([chunk], device=device), positions, cache, slot, start + len(chunk))
        logprobs = torch.log_softmax(model.logits(hidden[0, : len(targets)]), dim=-1)
        out.extend(logprobs.gather(-1, targets[:, None])[:, 0].tolist())
    return out


def score_rows(engine, rows) -> list[ScoreResult]:
    """Engine.score_batch's work for rows of (index, prompt ids, completion ids) in the student's space:
    each completion token's log-prob under both models. A student token mapped to several teacher ids
    gets the sum of their log-probs."""
    student_seqs = [p + c for _, p, c in rows]
    teacher_seqs, teacher_spans = [], []
    for i, prompt, completion in rows:
        t_prompt = engine.space.to_teacher(prompt, what=f"prompt {i}:")
        spans, seq = [], list(t_prompt)
        for tok in completion:
            pieces = engine.space.to_teacher([tok], what=f"completion {i}:")
            spans.append((len(seq), len(pieces)))
            seq.extend(pieces)
        teacher_seqs.append(seq)
        teacher_spans.append(spans)
    for (i, _, _), s, t in zip(rows, student_seqs, teacher_seqs):
        if max(len(s), len(t)) > engine.max_seq_len:
            raise ValueError(f"prompt {i} with its completion has {len(s)} tokens ({len(t)} in the teacher's "
                             f"space), more than max_seq_len {engine.max_seq_len}")
    student_spans = [[(len(p) + j, 1) for j in range(len(c))] for _, p, c in rows]
    student_lp = _span_logprobs(engine.student, engine.student_cache, student_seqs, student_spans)
    teacher_lp = _span_logprobs(engine.teacher, engine.teacher_cache, teacher_seqs, teacher_spans)
    return [ScoreResult(t, s) for t, s in zip(teacher_lp, student_lp)]


def _span_logprobs(model, cache, seqs, spans):
    """Sum of log-probs of seq[a : a + n] for each span (a, n): one mapped token may be several ids."""
    out = []
    for seq, row_spans in zip(seqs, spans):
        flat = teacher_forced_logprobs(model, cache, seq)  # flat[q]: log-prob of seq[q + 1]
        out.append([sum(flat[a - 1 + k] for k in range(n)) for a, n in row_spans])
    return out
