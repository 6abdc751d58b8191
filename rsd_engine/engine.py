"""The two-model RSD engine: a teacher and a student decoding side by side over static KV caches."""
from __future__ import annotations

import numbers
import operator
import random

import torch

from .models import load_model
from .models.hub import resolve_model
from .params import SamplingParams
from . import randomness
from .randomness import step_uniforms
from .results import GenerationResult, ScoreResult
from .sampling import FLAG_REASONS, RowParams, resolve_backend, rsd_sample
from .runtime import kv_bucket, progress_bar, resolve_device, resolve_dtype, warn_past_context
from .sizes import check_size
from .scheduler import Request, Scheduler
from .scoring import score_rows
from .speculative import SpeculativeDecoder, check_draft_tokens
from .cuda_graph import SelfFeedingGraphs
from .step import (GRAPH_BUCKETS, PADDING_PARAMS, STEP_INPUTS, StepState, advance_and_pack, pack_outputs, row_values,
                   step_inputs)
from .pipeline.data import not_unicode
from .pipeline.prompts import chat_prompt_text, is_chat
from .tokens import align_token_spaces, load_tokenizer

PREFILL_CHUNK = 512  # prompt tokens per row per forward


def _is_token_id(t) -> bool:
    """A token id as a prompt or completion may give it: any integer (numpy's too), never a bool."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


class Engine:
    """Batched Reverse Speculative Decoding.

    ``teacher`` and ``student`` are model folders (config.json, safetensors, tokenizer files) or Hugging Face
    Hub ids (``Qwen/Qwen3-0.6B``), fetched into the Hub cache at ``teacher_revision`` / ``student_revision``
    (branch, tag or commit; default main; models/hub.py). A folder that exists wins over a Hub id.
    ``sampler`` picks the RSD-sample backend: "auto" (C++ on CPU, Triton on CUDA), "reference",
    "cpp" or "triton". ``draft_tokens`` = G > 0 decodes in exact speculative rounds (speculative.py): the
    student drafts G tokens and the teacher verifies them in one forward; 0 is plain RSD. ``pipelined``
    (True on CUDA) commits each step while the next one runs (see _decode); the tokens are the same.
    """

    _eos_unwritable = ""  # why requests waiting for an EOS are refused (_why_eos_unwritable); "" if they are not

    def __init__(self, teacher, student, *, device="auto", dtype="auto", max_batch_size: int = 32,
                 max_seq_len: int = 4096, sampler: str = "auto", token_map: dict[str, str] | None = None,
                 draft_tokens: int = 0, teacher_revision: str | None = None, student_revision: str | None = None):
        self._setup_runtime(device, dtype, max_batch_size, max_seq_len)
        self.draft_tokens = check_draft_tokens(draft_tokens, self.max_seq_len)
        self.teacher_path = resolve_model(teacher, teacher_revision)
        self.student_path = resolve_model(student, student_revision)

        self.teacher = load_model(self.teacher_path, dtype=self.dtype, device=self.device)
        self.student = load_model(self.student_path, dtype=self.dtype, device=self.device)
        warn_past_context(self.max_seq_len, teacher=self.teacher, student=self.student)
        self.teacher_tokenizer = load_tokenizer(self.teacher_path)
        self.tokenizer = load_tokenizer(self.student_path)
        self.space = align_token_spaces(
            self.teacher_tokenizer, self.tokenizer, teacher_rows=self.teacher.config.vocab_size,
            student_rows=self.student.config.vocab_size, token_map=token_map).to(self.device)
        self.sampler_masks = self.space.sampler_masks(min(self.teacher.config.vocab_size,
                                                          self.student.config.vocab_size))
        self.sampler = resolve_backend(sampler, self.device)
        self.eos_token_ids = self._eos_ids()
        self._eos_unwritable = self._why_eos_unwritable()

        # One extra slot is scratch space for padding rows.
        self.teacher_cache = self.teacher.new_cache(self.max_batch_size + 1, self.max_seq_len)
        self.student_cache = self.student.new_cache(self.max_batch_size + 1, self.max_seq_len)
        self._graphs = {}  # CUDA: the SelfFeedingGraphs, under the attention span they pass (max_seq_len)
        # How a committed student token moves the teacher on (a mapped token: all its pieces, see _commit).
        teacher_next = torch.arange(self.space.size)
        teacher_advance = torch.ones(self.space.size, dtype=torch.long)
        for token, pieces in self.space.teacher_pieces.items():
            teacher_next[token], teacher_advance[token] = pieces[-1], len(pieces)
        self._teacher_next, self._teacher_advance = teacher_next.to(self.device), teacher_advance.to(self.device)
        self._speculative = SpeculativeDecoder(self, self.draft_tokens) if self.draft_tokens else None
        self._state = self._speculative.state() if self.draft_tokens else self._step_state(STEP_INPUTS, out_columns=4)

    def _setup_runtime(self, device, dtype, max_batch_size, max_seq_len):
        max_batch_size = check_size("max_batch_size", max_batch_size, 1)
        max_seq_len = check_size("max_seq_len", max_seq_len, 2)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        # Commit step n while step n+1 runs (see _decode): on CUDA, where the host's work can overlap.
        self.pipelined = self.device.type == "cuda"
        self._pending = None  # the step in flight: (its batch, requests whose row it must drop, its read)

    def _step_state(self, fields: dict[str, torch.dtype], out_columns: int, values=row_values) -> StepState:
        # Padding rows decode a dummy token into the scratch slot (the extra last one) and stay where they are.
        return StepState(fields, self.max_batch_size, self.device, {"slots": self.max_batch_size, **PADDING_PARAMS},
                         out_columns, values)

    # ------------------------------------------------------------------ generation

    def generate_batch(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                       progress: bool = False) -> list[GenerationResult]:
        """RSD traces for ``prompts``, in prompt order. A prompt is a string, a list of token ids, or chat
        messages (a list of {"role", "content"} dicts) that go through the student's chat template.

        A request whose logits turn non-finite ends alone with ``finish_reason == "error"`` and the reason
        in ``error``; the rest of the batch goes on."""
        results: list[GenerationResult | None] = [None] * len(prompts)
        for index, result in self.generate_iter(prompts, params, progress=progress):
            results[index] = result
        return results

    def generate_iter(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                      progress: bool = False):
        """Like generate_batch, but yields ``(prompt_index, result)`` as each sequence finishes.

        The rows in flight live in the engine's caches until the iterator is exhausted or closed; while
        it is paused, score_batch and another generate_iter of this engine are refused (they would
        overwrite them)."""
        scheduler = Scheduler(self.max_batch_size)
        # The scheduler holds each request only until it finishes: a long stream keeps no old results alive.
        for request in self._make_requests(prompts, params):
            scheduler.add(request)
        self._claim_caches("generate_iter")
        bar = progress_bar(len(scheduler.waiting), progress)
        try:
            self._stream_open = True
            while scheduler.has_work():
                with torch.inference_mode():
                    admitted = scheduler.admit()
                    if admitted:
                        self._prefill(admitted)
                    finished = self._decode(scheduler.batch())
                for request in finished:
                    scheduler.finish(request)
                    self._release(request.slot)
                    if bar is not None:
                        bar.update(1)
                    yield request.index, request.result
        finally:
            for slot in list(scheduler.running):  # stopped early: what was in flight is dropped
                self._release(slot)
            self._stream_open = False
            self._state.requests, self._pending = [], None  # nor are its rows kept, nor its step in flight
            if bar is not None:
                bar.close()

    _stream_open = False  # a generate_iter has started and is neither exhausted nor closed

    def _claim_caches(self, what: str):
        if self._stream_open:
            raise RuntimeError(f"{what} called while a generate_iter of this engine is paused: its rows in flight "
                               f"are in the caches that {what} would overwrite. Exhaust the iterator or close() it "
                               f"first (or use another engine)")

    def _caches(self):
        """The KV caches the decode step writes (a Generator has one)."""
        return self.teacher_cache, self.student_cache

    def _release(self, slot: int):
        """Give a finished slot's cache memory back (see models/kv_cache.py)."""
        for cache in self._caches():
            cache.release(slot)

    def _make_requests(self, prompts, params) -> list[Request]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings, token-id lists or chat-message lists, "
                            f"got {type(prompts).__name__}")
        if is_chat(prompts):
            raise TypeError("prompts is one conversation (a list of message dicts): pass a list of conversations, "
                            "e.g. [messages]")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not isinstance(params, (list, tuple)):  # a dict of settings iterated as its keys: "params[0] is a str"
            raise TypeError(f"params must be a SamplingParams or a list of them (one per prompt), got "
                            f"{type(params).__name__}" + (": e.g. SamplingParams(**settings)" if isinstance(params, dict)
                                                          else ""))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: pass one, or one per prompt")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a SamplingParams")
            if self._eos_unwritable and not p.ignore_eos:
                raise ValueError(f"request {i}: {self._eos_unwritable}")
            ids = self._tokenize(prompt, i)
            teacher_ids = self._teacher_prompt(ids, i)
            if max(len(ids), len(teacher_ids)) >= self.max_seq_len:
                other = f" ({len(teacher_ids)} in the teacher's space)" if teacher_ids else ""
                raise ValueError(f"prompt {i} has {len(ids)} tokens{other} but max_seq_len is {self.max_seq_len}: "
                                 f"prompts must be shorter than max_seq_len")
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            requests.append(Request(i, ids, teacher_ids, p, seed, GenerationResult(list(ids), seed=seed)))
        return requests

    def _teacher_prompt(self, ids: list[int], index: int) -> list[int]:
        return self.space.to_teacher(ids, what=f"prompt {index}:")

    def _tokenize(self, prompt, index) -> list[int]:
        if reason := not_unicode(prompt, f"prompt {index}"):  # the tokenizer's own error named no prompt
            raise ValueError(reason)
        if is_chat(prompt):  # chat messages: the student's chat template, as `rsd generate` renders them
            prompt = chat_prompt_text(self.tokenizer, prompt, what=f"prompt {index}")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple)) and all(map(_is_token_id, prompt)):
            ids = [operator.index(t) for t in prompt]  # numpy's integers as Python's
        else:
            odd = next((t for t in prompt if not _is_token_id(t)), None) if isinstance(prompt, (list, tuple)) else None
            got = (f"a list holding a {type(odd).__name__} ({odd!r})" if odd is not None and not isinstance(odd, dict)
                   else type(prompt).__name__)
            raise TypeError(f"prompt {index} must be a string, a list of token ids or a list of chat messages "
                            f"({{'role', 'content'}} dicts), got {got}")
        if not ids:
            raise ValueError(f"prompt {index} is empty: every prompt needs at least one token")
        self._check_ids(ids, f"prompt {index}")
        return ids

    _outside = "has no equivalent in the teacher's token space"  # what an id past _vocab_rows is

    def _vocab_rows(self) -> int:
        """Ids a sequence may hold: the token space (the student's rows the teacher can read or map)."""
        return self.space.size

    def _check_ids(self, ids, what: str) -> None:
        rows = self._vocab_rows()
        bad = next(((k, t) for k, t in enumerate(ids) if not 0 <= t < rows), None)
        if bad is not None:
            why = self._why_outside(bad[1])
            raise ValueError(f"{what}: token {bad[0]} (id {bad[1]}) {self._outside}: ids must be in [0, {rows})"
                             + (f" ({why})" if why else ""))

    def _why_outside(self, token: int) -> str:
        """Why a student id past the token space is there (a student-only token past the teacher's rows)."""
        return self.space.unmapped.get(token, "")

    def _completion_ids(self, completion, index) -> list[int]:
        """A completion to score: text (the student's tokens) or a list of token ids."""
        if isinstance(completion, str):
            if reason := not_unicode(completion, f"completion {index}"):
                raise ValueError(reason)
            return self.tokenizer.encode(completion, add_special_tokens=False)
        if not isinstance(completion, (list, tuple)):
            raise TypeError(f"completion {index} must be a string or a list of token ids, got "
                            f"{type(completion).__name__}")
        odd = next((t for t in completion if not _is_token_id(t)), None)
        if odd is not None:
            raise TypeError(f"completion {index} must be a string or a list of token ids, got a list holding a "
                            f"{type(odd).__name__} ({odd!r})")
        completion = [operator.index(t) for t in completion]  # numpy's integers as Python's
        self._check_ids(completion, f"completion {index}")
        return completion

    def _prefill(self, requests: list[Request]):
        """Fill both caches with each prompt but its last token, which the first decode step reads."""
        for r in requests:
            r.next_student_token, r.next_teacher_token = r.prompt_ids[-1], r.teacher_prompt_ids[-1]
            r.student_len, r.teacher_len = len(r.prompt_ids) - 1, len(r.teacher_prompt_ids) - 1
        self._extend(self.student, self.student_cache, [(r.slot, r.prompt_ids[:-1]) for r in requests])
        self._extend(self.teacher, self.teacher_cache, [(r.slot, r.teacher_prompt_ids[:-1]) for r in requests])

    def _extend(self, model, cache, rows: list[tuple[int, list[int]]], starts: list[int] | None = None):
        """Append token runs to cache slots (no logits): rows of (slot, ids), right-padded in chunks."""
        starts = starts or [0] * len(rows)
        rows = [(slot, ids, start) for (slot, ids), start in zip(rows, starts) if ids]
        if not rows:
            return
        longest = max(len(ids) for _, ids, _ in rows)
        for offset in range(0, longest, PREFILL_CHUNK):
            chunk = [(slot, ids[offset:offset + PREFILL_CHUNK], start + offset) for slot, ids, start in rows
                     if len(ids) > offset]
            width = max(len(ids) for _, ids, _ in chunk)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            positions = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, (_, ids, start) in enumerate(chunk):
                tokens[b, : len(ids)] = torch.tensor(ids)
                # Padding entries write at positions past the row's end, overwritten before they are read.
                positions[b] = torch.arange(start, start + width)
            slots = torch.tensor([slot for slot, _, _ in chunk])
            kv_len = kv_bucket(max(start for _, _, start in chunk) + width, self.max_seq_len)
            model(tokens.to(self.device), positions.to(self.device), cache, slots.to(self.device), kv_len)

    def _decode(self, batch: list[Request]) -> list[Request]:
        """One RSD step (or speculative round) for every running request; returns the requests that finished.

        Pipelined (``self.pipelined``, on by default on CUDA): the step for ``batch`` is launched first, then
        the previous step's outputs are committed while it runs. Rows move on by themselves on the device,
        so the new step needs nothing from that commit, except for rows the commit ends or disturbs: a
        finished request's extra step is dropped, and a row that wrote a mapped token (the teacher reads its
        pieces on the host first) has its extra step dropped and is sent again, to redo that step. Each
        row's uniforms depend on its own step counter only (DESIGN.md §3), so the tokens are the same."""
        if self._speculative is not None:
            return self._speculative.decode(batch)
        if not self.pipelined:
            return self._commit_step(batch, self._launch(batch)())
        previous, self._pending = self._pending, (list(batch), set(), self._launch(batch, lookahead=2))
        if previous is None:
            return []
        launched, dropped, rows = previous
        kept = [(r, row) for r, row in zip(launched, rows()) if not r.result.finish_reason and id(r) not in dropped]
        finished = self._commit_step([r for r, _ in kept], [row for _, row in kept])
        disturbed = {id(r) for r, row in kept if not r.result.finish_reason and self._disturbs(row)}
        self._pending[1].update(disturbed)
        self._state.dirty.update(disturbed)
        return finished

    def _commit_step(self, batch: list[Request], rows: list[list[float]]) -> list[Request]:
        return self._commit(batch, [[(int(token), accepted, teacher_lp, student_lp)]
                                    for token, accepted, teacher_lp, student_lp in rows])

    def _disturbs(self, row: list[float]) -> bool:
        """Whether committing this step's row changes the host's state beyond what the device's advance did."""
        return int(row[0]) in self.space.teacher_pieces

    def _commit(self, batch: list[Request], runs) -> list[Request]:
        """Append each request's run of (token, accepted, teacher_lp, student_lp) from one teacher pass.
        A run ends at the first token that finishes its request, and after a mapped token (the teacher
        reads its pieces first); returns the requests that finished."""
        finished, expansions = [], []
        for r, run in zip(batch, runs):
            r.result.teacher_passes += 1
            for token, accepted, teacher_lp, student_lp in run:
                if token < 0:  # the sampler flagged this row: it ends here, the others go on
                    self._fail(r, token)
                    finished.append(r)
                    break
                res = r.result
                pieces = self.space.teacher_pieces.get(token)
                res.token_ids.append(token)
                res.accepted.append(bool(accepted))
                # A token mapped to several teacher tokens: the step's teacher row scores only the first. Not
                # measured here (score_batch sums its pieces). One the teacher proposes as its own token is scored
                # as that (TokenSpace.teacher_columns); others read a column of another token.
                res.teacher_logprobs.append(teacher_lp if pieces is None or token in self.space.teacher_columns
                                            else float("nan"))
                res.student_logprobs.append(student_lp)
                r.student_len += 1
                r.teacher_len += 1
                r.next_student_token = token
                if pieces is not None:
                    expansions.append((r, pieces))
                r.next_teacher_token = token if pieces is None else pieces[-1]
                reason = self._finish_reason(r, extra_teacher=len(pieces) - 1 if pieces else 0)
                if (reason == "length" and pieces is not None and len(res.token_ids) < r.params.max_new_tokens
                        and r.teacher_len + len(pieces) > self.max_seq_len):
                    # Stopped by max_seq_len, on a mapped token whose pieces do not fit it (the sequence is
                    # teacher_len + 1 tokens, the next one still to read): the trace ends before it. One that ends
                    # the request otherwise (EOS, a stop, max_new_tokens) is kept: its pieces are never read.
                    self._unappend(r)
                if reason:
                    self._finalize(r, reason)
                    finished.append(r)
                if reason or pieces is not None:
                    break
        # A mapped student token is several teacher tokens: the teacher reads all but the last now.
        live = [(r, p) for r, p in expansions if not r.result.finish_reason]
        if live:
            self._extend(self.teacher, self.teacher_cache, [(r.slot, list(p[:-1])) for r, p in live],
                         starts=[r.teacher_len for r, _ in live])
            for r, p in live:
                r.teacher_len += len(p) - 1
        return finished

    @staticmethod
    def _unappend(r: Request):
        """Take the last committed token back (_commit appended it)."""
        res = r.result
        for values in (res.token_ids, res.accepted, res.teacher_logprobs, res.student_logprobs):
            values.pop()
        r.student_len -= 1
        r.teacher_len -= 1

    def _run_decode_step(self, batch: list[Request], step=None, lookahead: int = 1) -> list[list[float]]:
        """One decode step for ``batch``; its packed outputs, one row per request (see _launch)."""
        return self._launch(batch, step, lookahead)()

    def _launch(self, batch: list[Request], step=None, lookahead: int = 1):
        """Start one decode step for ``batch`` over the device-resident step state (step.py's StepState): at
        most one upload (rows that changed), one read of the packed outputs; returns the function that waits
        for them. ``step(inputs, teacher_kv=, student_kv=)`` runs the step and moves the rows on (default
        _step_and_advance); it writes up to ``lookahead`` positions past a row's cache length as the host
        knows it (2 while pipelined: the device may be a step ahead)."""
        step = step or self._step_and_advance
        state = self._state
        state.sync(batch)
        n = len(batch)
        teacher_len = max(r.teacher_len for r in batch) + lookahead
        student_len = max(r.student_len for r in batch) + lookahead
        if self.device.type != "cuda":
            # Slots 0..B-1 in order are read as a slice of the cache instead of gathered.
            contiguous = all(r.slot == b for b, r in enumerate(batch))
            packed = step(state.inputs(n, with_slots=not contiguous),
                          teacher_kv=kv_bucket(teacher_len, self.max_seq_len),
                          student_kv=kv_bucket(student_len, self.max_seq_len))
            return state.start_read(packed)
        # On CUDA: one graph per batch bucket, captured on first use and replayed. Attention reads each row's
        # own span off the cache (CausalLM._forward_triton), so the span is no graph key.
        kv = self.max_seq_len
        if kv not in self._graphs:
            self._graphs[kv] = self._capture(kv, step)
        self._graphs[kv](n)
        return state.start_read(state.out[:n])

    def _capture(self, kv: int, step=None) -> SelfFeedingGraphs:
        """Graphs of the step that feeds itself: each reads the state's rows, writes the packed outputs to
        ``state.out`` and moves the rows on."""
        step = step or self._step_and_advance
        state = self._state

        def run(bucket: int):
            step(state.inputs(bucket), teacher_kv=kv, student_kv=kv, out=state.out[:bucket])

        n = self.max_batch_size
        buckets = sorted({b for b in GRAPH_BUCKETS if b < n} | {n})
        with state.padded():  # warm-up runs the step: only on padding rows, then the real rows come back
            return SelfFeedingGraphs(run, buckets=buckets, enabled=self.device.type == "cuda")

    def _step_inputs(self, batch: list[Request], *, with_slots: bool) -> dict[str, torch.Tensor]:
        return step_inputs(batch, self.device, with_slots=with_slots)

    def _step_and_advance(self, inputs: dict[str, torch.Tensor], *, teacher_kv: int, student_kv: int,
                          out: torch.Tensor | None = None):
        """decode_step, then move the rows on in place (the next step's inputs); returns the packed outputs
        (written into ``out`` when given, see pack_outputs)."""
        sampled = self.decode_step(inputs, teacher_kv=teacher_kv, student_kv=student_kv)
        if out is not None and (sampled.token.is_cuda or randomness.KERNEL_ON_CPU):
            # The captured step on CUDA: the advance and the packing in one launch instead of twelve.
            return advance_and_pack(inputs, sampled, self._teacher_next, self._teacher_advance, self.max_batch_size,
                                    out)
        self._advance(inputs, sampled.token)
        return pack_outputs([sampled.token, sampled.accepted, sampled.teacher_logprob, sampled.student_logprob], out)

    def _advance(self, inputs: dict[str, torch.Tensor], token: torch.Tensor):
        """The device's copy of _commit for one token per row (a flagged row's junk is dropped when it
        leaves the batch); padding rows (the scratch slot) keep their positions."""
        token, live = self._advance_student(inputs, token)
        torch.index_select(self._teacher_next, 0, token, out=inputs["teacher_tokens"])
        inputs["teacher_pos"].add_(self._teacher_advance[token] * live)

    def _advance_student(self, inputs: dict[str, torch.Tensor], token: torch.Tensor):
        # Results written straight into the state (out=), bools added as they are: each op is a CUDA kernel.
        token = torch.clamp_min(token, 0, out=inputs["student_tokens"])
        live = inputs["slots"] != self.max_batch_size if "slots" in inputs else 1
        inputs["student_pos"].add_(live)
        inputs["steps"].add_(live)
        return token, live

    def decode_step(self, inputs: dict[str, torch.Tensor], *, teacher_kv: int, student_kv: int):
        """Teacher forward, student forward, fused RSD sample: static shapes, no host syncs.
        ``inputs`` as built by _step_inputs (without "slots": rows are slots 0..B-1)."""
        slots = inputs.get("slots")
        hidden_t = self.teacher(inputs["teacher_tokens"][:, None], inputs["teacher_pos"][:, None],
                                self.teacher_cache, slots, teacher_kv)
        hidden_s = self.student(inputs["student_tokens"][:, None], inputs["student_pos"][:, None],
                                self.student_cache, slots, student_kv)
        teacher_logits = self.space.align_teacher(self.teacher.sampler_logits(hidden_t[:, 0]))
        student_logits = self.student.sampler_logits(hidden_s[:, 0])
        uniforms = step_uniforms(inputs["seeds"], inputs["steps"])
        params = RowParams(*(inputs[name] for name in RowParams._fields))
        # The rows' values were checked by SamplingParams; reading them back here would sync (checks.py).
        return rsd_sample(teacher_logits, student_logits, uniforms, params, *self.sampler_masks, backend=self.sampler,
                          check_values=False)

    def _fail(self, r: Request, flag: int):
        reason = FLAG_REASONS.get(flag, f"the sampler flagged the row with code {flag}")
        r.result.error = (f"{reason} at generation step {len(r.result.token_ids)} of prompt {r.index}; no token "
                          f"was sampled (teacher {self.teacher_path}, student {self.student_path})")
        self._finalize(r, "error")

    def _finish_reason(self, r: Request, extra_teacher: int) -> str:
        token, p, res = r.next_student_token, r.params, r.result
        if token in self.eos_token_ids and not p.ignore_eos:
            return "eos"
        if token in p.stop_token_ids:
            return "stop"
        if p.stop and self._hit_stop_string(r):
            return "stop"
        if len(res.token_ids) >= p.max_new_tokens:
            return "length"
        # A sequence (prompt + generated, in either model's space) holds at most max_seq_len tokens.
        if r.student_len + 1 >= self.max_seq_len or r.teacher_len + extra_teacher + 1 >= self.max_seq_len:
            return "length"
        return ""

    def _hit_stop_string(self, r: Request) -> bool:
        text = self.tokenizer.decode(r.result.token_ids, skip_special_tokens=False)
        longest = max(len(s) for s in r.params.stop)
        window_start = max(0, r.stop_scan_from - longest + 1)
        hits = [i for s in r.params.stop if (i := text.find(s, window_start)) >= 0]
        # A character whose bytes are still coming decodes as U+FFFD for now: search it again once it is whole.
        r.stop_scan_from = len(text.rstrip("\ufffd"))
        if hits:
            r.result.text = text[: min(hits)]
            r.cut_at_stop = True
            return True
        return False

    def _finalize(self, r: Request, reason: str):
        res = r.result
        res.finish_reason = reason
        if reason == "stop" and r.cut_at_stop:
            return  # text already cut at the stop string (empty where the output starts with it)
        ids = res.token_ids[:-1] if reason == "eos" else res.token_ids
        res.text = self.tokenizer.decode(ids, skip_special_tokens=False)

    def _why_eos_unwritable(self) -> str:
        """Why the student could never end a trace as it was trained to, or "": none of its own EOS ids is in the
        token space it writes from (every request would run to max_new_tokens, or end on a teacher EOS it seldom
        writes). Requests that wait for an EOS are refused with this (_make_requests); ignore_eos ones run."""
        own = set(self.student.config.eos_token_ids)  # the student's own, not the teacher's it may share
        if self.tokenizer.eos_token_id is not None:
            own.add(self.tokenizer.eos_token_id)
        writable = self.space.fallback_mask.tolist()  # once, at construction
        if not own or any(t < len(writable) and writable[t] for t in own):
            return ""
        why = "; ".join(f"id {t}: {self.space.unmapped.get(t, 'outside the token space both models share')}"
                        for t in sorted(own))
        # token_map cannot reach past the teacher's rows: the space ends there.
        fix = ("give the teacher embedding rows up to it" if any(t >= self.space.size for t in own) else
               "map it to text the teacher reads with token_map")
        return (f"the student could never end a trace: none of its EOS ids is a token it may write here ({why}). "
                f"To write it, {fix}; or set ignore_eos in SamplingParams")

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.student.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        # The teacher's EOS stops too where the student's space has it.
        ids.update(t for t in self.teacher.config.eos_token_ids if self.space.is_shared(t))
        ids.update(s for s, t in self.space.teacher_columns.items() if t in self.teacher.config.eos_token_ids)
        return frozenset(ids)

    # ------------------------------------------------------------------ scoring

    def score_batch(self, prompts, completions) -> list[ScoreResult]:
        """Teacher-forced log-probs of each completion token given the prompt and the tokens before it,
        under both models; every cache slot scores a sequence per forward (see scoring.py). A trace the engine
        wrote always fits: the teacher log-prob of a last token whose teacher pieces pass max_seq_len is NaN.
        It overwrites the caches: refused while a generate_iter of this engine is paused."""
        self._claim_caches("score_batch")
        if isinstance(prompts, (str, bytes)) or isinstance(completions, (str, bytes)):
            raise TypeError("prompts and completions must be lists (of strings or token-id lists)")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions: they must pair up")
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            prompt_ids, completion_ids = self._tokenize(prompt, i), self._completion_ids(completion, i)
            if isinstance(completion, str):
                # A text that continues its prompt, tokenised with it and split after the prompt's tokens (as
                # `rsd score` and TRL do): a sentencepiece tokenizer reads a text's leading space otherwise alone.
                whole = self.tokenizer.encode(self.tokenizer.decode(prompt_ids) + completion, add_special_tokens=False)
                if whole[:len(prompt_ids)] == prompt_ids and whole[len(prompt_ids):] != completion_ids:
                    completion_ids = whole[len(prompt_ids):]
                    self._check_ids(completion_ids, f"completion {i}")
            rows.append((i, prompt_ids, completion_ids))
        try:
            return score_rows(self, rows)
        finally:
            for slot in range(min(len(rows), self.max_batch_size + 1)):  # the slots scoring wrote
                self._release(slot)
