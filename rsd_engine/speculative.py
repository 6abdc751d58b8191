"""Exact speculative RSD (DESIGN.md §8): the student drafts, the teacher verifies a round in one forward.

A round, for every running request at once, with static shapes (G = draft_tokens):
  1. draft: G one-token student forwards, each drawing the next draft token from the student's fallback
     law qS (``sample_tokens``), then one more forward so that student logits exist at all G+1 positions;
  2. verify: one teacher forward over [B, G+1] (the pending token, then the G drafts);
  3. ``rsd_verify`` keeps a prefix of the row's first ``num_draft`` drafts and adds one token (a residual
     after a rejection, else a bonus), so every emitted token follows the RSD law Q exactly.
Rolling back is lowering each row's cache lengths to the tokens kept: positions past them are rewritten
before anything attends to them.

The host commits each row's emitted run through the engine's finish rules token by token and cuts it at
the first stop (EOS, stop ids or strings, max_new_tokens, max_seq_len). Where a run ends depends only on
the tokens before the cut, so every kept token keeps its law. ``num_draft`` is sized per row so that a
round never reaches past max_new_tokens or max_seq_len.

Mapped student tokens (several teacher tokens, ``TokenSpace.teacher_pieces``) end a row's run: the
teacher verifies a mapped draft at its own position, but reads a stand-in for it (its first piece), so
its logits after it are wrong and whatever the round emits after a mapped token is dropped (again a cut
that depends only on the tokens before it). The engine then feeds the teacher the token's pieces as in
plain mode. Cost: a round that drafts a mapped token emits at most up to it.

Randomness: the round starting at generation step t reads positions t .. t+G of ``round_uniforms``
(pure functions of seed, position and draw), so a request's output does not depend on its batch.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from . import randomness
from .randomness import DRAFT_DRAW, round_uniforms
from .sampling import RowParams, VerifyOutput, rsd_verify, sample_tokens
from .step import STEP_INPUTS, pack_outputs, round_advance_and_pack, row_values, step_inputs

# max_new_tokens: the device sizes each row's next num_draft itself (_advance), as _num_draft does.
ROUND_INPUTS = {**STEP_INPUTS, "num_draft": torch.int32, "max_new_tokens": torch.long}


def check_draft_tokens(draft_tokens, max_seq_len: int) -> int:
    if not isinstance(draft_tokens, numbers.Integral) or isinstance(draft_tokens, bool) or draft_tokens < 0:
        raise ValueError(f"draft_tokens = {draft_tokens!r}: must be an integer >= 0 (0 = plain RSD, one teacher "
                         f"pass per token)")
    # The shortest request (a one-token prompt) must fit a whole round: its prompt plus G+1 tokens.
    if draft_tokens + 2 > max_seq_len:
        raise ValueError(f"draft_tokens = {draft_tokens}: a round of {draft_tokens + 1} tokens after a one-token "
                         f"prompt cannot fit max_seq_len = {max_seq_len}; use draft_tokens <= {max_seq_len - 2}")
    return int(draft_tokens)


@dataclass
class DraftStats:
    """Counts over all rounds, for the per-token draft acceptance α = kept / checked (DESIGN.md §8)."""

    rounds: int = 0  # row-rounds: teacher passes
    checked: int = 0  # drafts that reached the keep test
    kept: int = 0
    emitted: int = 0  # tokens committed to results, after cuts at stops

    @property
    def alpha(self) -> float:
        return self.kept / self.checked if self.checked else float("nan")


class SpeculativeDecoder:
    """Speculative rounds for ``engine`` with ``draft_tokens`` drafts each; ``decode`` replaces the plain step."""

    def __init__(self, engine, draft_tokens: int):
        self.engine = engine
        self.draft_tokens = draft_tokens
        self.stats = DraftStats()
        self.backend = engine.sampler  # sample_tokens and rsd_verify have the same three backends
        space = engine.space
        # The teacher reads each draft by its own id; a mapped id reads its first piece as a stand-in.
        teacher_ids = torch.arange(space.size, dtype=torch.long)
        for student_id, pieces in space.teacher_pieces.items():
            teacher_ids[student_id] = pieces[0]
        self.teacher_ids = teacher_ids.to(engine.device)
        mapped = torch.zeros(space.size, dtype=torch.bool)
        mapped[list(space.teacher_pieces)] = True
        self.mapped = mapped.to(engine.device)

    def state(self):
        """The engine's step state for rounds: packed outputs are [num_emitted, tokens, accepted, teacher
        log-probs, student log-probs], each but the first G+1 wide."""
        def values(r):
            # (past max_seq_len a budget is the same: 2**63 and more would not fit the device's int64)
            return {**row_values(r), "num_draft": self._num_draft(r),
                    "max_new_tokens": min(r.params.max_new_tokens, self.engine.max_seq_len)}

        return self.engine._step_state(ROUND_INPUTS, out_columns=1 + 4 * (self.draft_tokens + 1), values=values)

    # ------------------------------------------------------------------ host side

    def decode(self, batch) -> list:
        """One round for every running request; returns the requests that finished."""
        W = self.draft_tokens + 1
        runs = []
        for r, row in zip(batch, self._run_round(batch)):
            m = int(row[0])
            tokens = [int(t) for t in row[1:1 + m]]
            runs.append(list(zip(tokens, row[1 + W:1 + W + m], row[1 + 2 * W:1 + 2 * W + m], row[1 + 3 * W:1 + 3 * W + m])))
            # All num_draft drafts kept and a bonus, or m-1 kept and the m-th rejected.
            n = self._num_draft(r)
            self.stats.kept += min(m - 1, n)
            self.stats.checked += n if m == n + 1 else m
        self.stats.rounds += len(batch)
        before = sum(len(r.result.token_ids) for r in batch)
        finished = self.engine._commit(batch, runs)
        self.stats.emitted += sum(len(r.result.token_ids) for r in batch) - before
        return finished

    def _num_draft(self, r) -> int:
        """Drafts a row verifies this round: at most G, and few enough that the G+1-th token still fits."""
        e = self.engine
        room = min(r.params.max_new_tokens - len(r.result.token_ids),
                   e.max_seq_len - (r.student_len + 1), e.max_seq_len - (r.teacher_len + 1))
        return max(0, min(self.draft_tokens, room - 1))

    def round_inputs(self, batch, *, with_slots: bool) -> dict[str, torch.Tensor]:
        inputs = step_inputs(batch, self.engine.device, with_slots=with_slots)
        inputs["num_draft"] = torch.tensor([self._num_draft(r) for r in batch], dtype=torch.int32).to(
            self.engine.device, non_blocking=True)
        return inputs

    def _run_round(self, batch) -> list[list[float]]:
        return self.engine._run_decode_step(batch, self._round_and_advance, lookahead=self.draft_tokens + 1)

    # ------------------------------------------------------------------ device side

    def round(self, inputs: dict[str, torch.Tensor], *, teacher_kv: int, student_kv: int):
        """Draft, verify: static shapes, no host syncs. ``inputs`` as built by round_inputs (without
        "slots": rows are slots 0..B-1). Returns rsd_verify's VerifyOutput over [B, G+1]."""
        e, G = self.engine, self.draft_tokens
        slots = inputs.get("slots")
        params = RowParams(*(inputs[name] for name in RowParams._fields))
        uniforms = round_uniforms(inputs["seeds"], inputs["steps"], G + 1)

        token, position = inputs["student_tokens"], inputs["student_pos"]
        student_logits, drafts = [], []
        for i in range(G + 1):
            hidden = e.student(token[:, None], (position + i)[:, None], e.student_cache, slots, student_kv)
            logits = e.student.sampler_logits(hidden[:, 0])
            student_logits.append(logits)
            if i < G:
                draft = sample_tokens(logits, uniforms[:, i, DRAFT_DRAW].contiguous(), params.student_temperature,
                                      params.student_top_k, params.student_top_p, e.sampler_masks[1],
                                      backend=self.backend, check_values=False)  # SamplingParams checked them
                drafts.append(draft)
                # A flagged row (NaN logits) drafts -1: read token 0 instead; rsd_verify flags the row.
                token = draft.clamp_min(0)
        draft = torch.stack(drafts, dim=1)

        teacher_tokens = torch.cat([inputs["teacher_tokens"][:, None], self.teacher_ids[draft.clamp_min(0)]], dim=1)
        teacher_pos = inputs["teacher_pos"][:, None] + torch.arange(G + 1, device=teacher_tokens.device)
        hidden = e.teacher(teacher_tokens, teacher_pos, e.teacher_cache, slots, teacher_kv)
        teacher_logits = e.space.align_teacher(e.teacher.sampler_logits(hidden))
        return rsd_verify(teacher_logits, torch.stack(student_logits, dim=1), draft, inputs["num_draft"], uniforms,
                          params, *e.sampler_masks, backend=self.backend, check_values=False)

    def _round_and_advance(self, inputs: dict[str, torch.Tensor], *, teacher_kv: int, student_kv: int,
                           out: torch.Tensor | None = None):
        """round, then move the rows on in place as the host's commit will; returns the packed outputs
        (written into ``out`` when given, see pack_outputs)."""
        verified = self.round(inputs, teacher_kv=teacher_kv, student_kv=student_kv)
        if out is not None and (verified.tokens.is_cuda or randomness.KERNEL_ON_CPU):
            # The captured round on CUDA: the advance and the packing in one launch instead of about twenty.
            e = self.engine
            return round_advance_and_pack(inputs, verified, self.mapped, e._teacher_next, e._teacher_advance,
                                          e.max_batch_size, e.max_seq_len, self.draft_tokens, out)
        self._advance(inputs, verified)
        return pack_outputs([verified.num_emitted, verified.tokens, verified.accepted, verified.teacher_logprob,
                             verified.student_logprob], out)

    def _advance(self, inputs: dict[str, torch.Tensor], out: VerifyOutput):
        """The device's copy of the engine's commit of a round: a row takes its emitted run up to and including
        its first mapped token (the host cuts there; a run cut by a stop ends its request, whose row then
        leaves the batch), and the next round's num_draft is sized as _num_draft does."""
        e, width = self.engine, self.draft_tokens + 1
        emitted = out.num_emitted.long()
        index = torch.arange(width, device=emitted.device)
        tokens = out.tokens.clamp_min(0)
        mapped = self.mapped[tokens] & (index < emitted[:, None])
        count = torch.minimum(emitted, torch.where(mapped, index, width).amin(dim=1) + 1)
        if "slots" in inputs:  # padding rows (the scratch slot) stay where they are
            count = count * (inputs["slots"] != e.max_batch_size)
        moved = count > 0
        last = tokens.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]
        inputs["student_tokens"].copy_(torch.where(moved, last, inputs["student_tokens"]))
        inputs["teacher_tokens"].copy_(torch.where(moved, e._teacher_next[last], inputs["teacher_tokens"]))
        inputs["student_pos"].add_(count)
        inputs["teacher_pos"].add_(torch.where(moved, count - 1 + e._teacher_advance[last], 0))
        inputs["steps"].add_(count)
        room = torch.minimum(inputs["max_new_tokens"] - inputs["steps"],
                             e.max_seq_len - 1 - torch.maximum(inputs["student_pos"], inputs["teacher_pos"]))
        inputs["num_draft"].copy_((room - 1).clamp(0, self.draft_tokens))
