"""Teacher forcing: the log-probability of every token of a sequence given the tokens before it.

``score_sequences`` is the one batched scorer under one model (Engine.score_batch, Generator.score_batch,
`rsd score` and the provenance tools all go through it). Whole batches of sequences share each forward,
as chunked prefill over the static KV cache: rows are right-padded, and sorted longest first so that the
rows still running at any offset are slots 0..k-1 (a cache slice, no gather). Memory is bounded twice:
a forward holds at most FORWARD_TOKENS tokens (CPU_FORWARD_TOKENS on CPU), and the [rows, vocab]
logits exist only for the positions that are scored, LOGIT_ELEMENTS at a time, each block's
log_softmax gathered at the targets before the next block is projected.
"""
from __future__ import annotations

import torch

from .results import ScoreResult
from .runtime import kv_bucket

CHUNK = 512  # positions per row per forward (at most)
# Tokens per forward over all rows: bounds activations and the attention mask. On CPU a forward's
# activations should stay near the caches (2048 tokens measured fastest on the bench pair; 8192 ran ~25%
# slower); a GPU wants the bigger GEMMs.
FORWARD_TOKENS = 8192
CPU_FORWARD_TOKENS = 2048
LOGIT_ELEMENTS = 1 << 25  # float32 logits held at once (128 MiB): 220 rows of a 152k vocabulary


@torch.inference_mode()
def score_sequences(model, cache, seqs: list[list[int]], starts: list[int], *,
                    max_batch: int | None = None) -> list[list[float]]:
    """``out[i][j] = log p(seqs[i][starts[i] + j] | seqs[i][: starts[i] + j])`` under ``model``.

    ``starts[i]`` (>= 1) is the first scored token of sequence i (e.g. the prompt length); the tokens
    before it are read, not scored. Up to ``max_batch`` sequences (default: every slot of ``cache``)
    run per forward, in slots 0..max_batch-1 of ``cache``, whose contents they overwrite.
    Log-probs are over every row of the model's vocabulary (temperature 1, no truncation).
    """
    max_batch = cache.num_slots if max_batch is None else max_batch
    _check(model, cache, seqs, starts, max_batch)
    out: list[list[float] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for first in range(0, len(order), max_batch):
        group = order[first: first + max_batch]
        for i, lps in zip(group, _score_group(model, cache, [seqs[i] for i in group], [starts[i] for i in group])):
            out[i] = lps
    return out


def _score_group(model, cache, seqs, starts) -> list[list[float]]:
    """One batch of sequences, longest first, in slots 0..len(seqs)-1."""
    device = model.device
    out = [[] for _ in seqs]
    budget = CPU_FORWARD_TOKENS if device.type == "cpu" else FORWARD_TOKENS
    offset = 0
    while offset < len(seqs[0]):
        rows = sum(len(s) > offset for s in seqs)  # a prefix: the rows are sorted longest first
        width = min(CHUNK, max(1, budget // rows), len(seqs[0]) - offset)
        tokens = torch.zeros(rows, width, dtype=torch.long)
        picks, targets, owners = [], [], []
        for b in range(rows):
            seq, start = seqs[b], starts[b]
            piece = seq[offset: offset + width]
            tokens[b, : len(piece)] = torch.tensor(piece)
            # Logits at position q predict seq[q + 1]: scored positions are start - 1 .. len - 2.
            lo, hi = max(offset, start - 1), min(offset + len(piece), len(seq) - 1)
            if lo < hi:
                picks.append(torch.arange(lo - offset, hi - offset) + b * width)
                targets.extend(seq[lo + 1: hi + 1])
                owners.append((b, hi - lo))
        # Padding entries sit at positions past their row's end; the cache clamps and overwrites them.
        positions = torch.arange(offset, offset + width).expand(rows, width)
        kv_len = kv_bucket(offset + width, cache.max_seq_len)
        hidden = model(tokens.to(device), positions.to(device), cache, None, kv_len)
        if picks:
            flat = _target_logprobs(model, hidden.reshape(rows * width, -1), torch.cat(picks).to(device),
                                    torch.tensor(targets, device=device)).tolist()
            at = 0
            for b, n in owners:
                out[b].extend(flat[at: at + n])
                at += n
        offset += width
    return out


def _target_logprobs(model, hidden, picks, targets) -> torch.Tensor:
    """log_softmax(logits(hidden[picks]))[targets], the vocabulary projection a block of rows at a time."""
    block = max(1, LOGIT_ELEMENTS // model.config.vocab_size)
    out = []
    for a in range(0, len(picks), block):
        # log_softmax is one fused pass; logsumexp makes several over the block.
        logprobs = torch.log_softmax(model.logits(hidden[picks[a: a + block]]), dim=-1)
        out.append(logprobs.gather(-1, targets[a: a + block, None])[:, 0])
    return torch.cat(out)


def _check(model, cache, seqs, starts, max_batch):
    if len(seqs) != len(starts):
        raise ValueError(f"got {len(seqs)} sequences and {len(starts)} starts: give one start per sequence")
    if not isinstance(max_batch, int) or not 1 <= max_batch <= cache.num_slots:
        raise ValueError(f"max_batch = {max_batch!r}: must be an integer in [1, {cache.num_slots}] (the cache's slots)")
    vocab = model.config.vocab_size
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        if not isinstance(start, int) or not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: start {start!r} must be in [1, {len(seq)}] (its length); the first "
                             f"token has no context to be scored in")
        if len(seq) > cache.max_seq_len:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than the cache's max_seq_len {cache.max_seq_len}")
        bad = next((t for t in seq if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"sequence {i} holds token {bad!r}: token ids must be integers in [0, {vocab})")


def score_rows(engine, rows) -> list[ScoreResult]:
    """Engine.score_batch's work for rows of (index, prompt ids, completion ids) in the student's space:
    each completion token's log-prob under both models. A student token mapped to several teacher ids
    gets the sum of their log-probs."""
    teacher_seqs, teacher_spans = [], []
    for i, prompt, completion in rows:
        seq = list(engine.space.to_teacher(prompt, what=f"prompt {i}:"))
        seq.extend(engine.space.to_teacher(completion, what=f"completion {i}:"))  # (its errors name the position)
        teacher_seqs.append(seq)
        teacher_spans.append([len(engine.space.teacher_pieces.get(tok, (tok,))) for tok in completion])
    student_seqs = [p + c for _, p, c in rows]
    unread = []  # rows whose last token the teacher cannot read within max_seq_len (its log-prob: NaN)
    for k, ((i, _, completion), s, t) in enumerate(zip(rows, student_seqs, teacher_seqs)):
        # The engine keeps a mapped token that ends its request though its teacher pieces pass max_seq_len (the
        # teacher never reads them; the step's teacher log-prob is NaN): its trace is scored so too.
        last = teacher_spans[k][-1] if completion else 0
        if len(s) <= engine.max_seq_len < len(t) and last > 1 and len(t) - last <= engine.max_seq_len:
            del t[len(t) - last:]
            teacher_spans[k][-1] = 0
            unread.append(k)
        elif max(len(s), len(t)) > engine.max_seq_len:
            raise ValueError(f"prompt {i} with its completion has {len(s)} tokens ({len(t)} in the teacher's "
                             f"space), more than max_seq_len {engine.max_seq_len}")
    student_lp = score_sequences(engine.student, engine.student_cache, student_seqs, [len(p) for _, p, _ in rows])
    teacher_flat = score_sequences(engine.teacher, engine.teacher_cache, teacher_seqs,
                                   [len(t) - sum(n) for t, n in zip(teacher_seqs, teacher_spans)])
    teacher_lp = [_sum_spans(flat, spans) for flat, spans in zip(teacher_flat, teacher_spans)]
    for k in unread:
        teacher_lp[k][-1] = float("nan")
    return [ScoreResult(t, s) for t, s in zip(teacher_lp, student_lp)]


def _sum_spans(flat: list[float], spans: list[int]) -> list[float]:
    out, at = [], 0
    for n in spans:
        out.append(sum(flat[at: at + n]))
        at += n
    return out
