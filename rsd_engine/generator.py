"""Single-model generation: sampling from one model through the Engine's runtime.

Generator is the Engine with the two-model parts swapped out. It keeps the requests and their
validation, continuous batching over cache slots, chunked prefill, the finish rules (EOS, stop
strings and ids, max_new_tokens, the cache limit), per-request errors and the decode step's graph
capture; its decode step is one forward and the fused ``sample_tokens`` op. The one model sits in
the student's seat of a Request (its tokens, positions and cache length); the teacher's stay empty.

Randomness (DESIGN.md §3): the token at step t of a request with seed s is drawn by inverse CDF with
uniform (s, t, draw 0), the draw of RSD's student fallback. So Generator(student) with temperature,
top-k, top-p reproduces token for token an Engine run over the same student whose proposals are all
rejected (threshold 1) with those as the student's fallback settings.

SamplingParams fields that apply: max_new_tokens, temperature, top_p, top_k, seed, stop,
stop_token_ids, ignore_eos. The RSD-only fields (threshold, check_temperature, student_temperature,
student_top_p, student_top_k, proposal_trials) have no meaning here; a value other than the default
is refused rather than silently ignored.
"""
from __future__ import annotations

import importlib

import torch

from .engine import Engine
from .models import load_model
from .models.hub import resolve_model
from .params import SamplingParams
from .randomness import FALLBACK_DRAW, step_uniforms
from .runtime import warn_past_context
from .scheduler import Request
from .sampling import resolve_backend, sample_tokens
from .scoring import score_sequences
from .step import STEP_INPUTS, pack_outputs
from .tokens import id_to_token_table, load_tokenizer

RSD_ONLY_FIELDS = ("threshold", "check_temperature", "student_temperature", "student_top_p", "student_top_k",
                   "proposal_trials")


class Generator(Engine):
    """Batched sampling from one model (``model``: a folder with config.json, safetensors and tokenizer
    files, or a Hugging Face Hub id fetched at ``revision``, as for Engine). ``sampler`` picks the
    sampling backend as for Engine.

    ``generate_batch(prompts, params)`` / ``generate_iter`` return GenerationResult with ``token_ids``,
    ``text``, ``logprobs`` (each token's raw log-prob under the model), ``finish_reason`` and ``seed``.
    ``score_batch(prompts, completions)`` gives the teacher-forced log-probs of each completion token.
    """

    def __init__(self, model, *, device="auto", dtype="auto", max_batch_size: int = 32, max_seq_len: int = 4096,
                 sampler: str = "auto", revision: str | None = None):
        self._setup_runtime(device, dtype, max_batch_size, max_seq_len)
        self.model_path = resolve_model(model, revision)
        self.model = load_model(self.model_path, dtype=self.dtype, device=self.device)
        warn_past_context(self.max_seq_len, model=self.model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.sampler = _sample_backend(sampler, self.device)
        # Ids the tokenizer has (embedding padding rows past it are never drawn).
        table = id_to_token_table(self.tokenizer)
        vocab = self.model.config.vocab_size
        self.mask = torch.tensor([i < len(table) and table[i] is not None for i in range(vocab)], device=self.device)
        self.eos_token_ids = self._eos_ids()
        # One extra slot is scratch space for padding rows.
        self.cache = self.model.new_cache(self.max_batch_size + 1, self.max_seq_len)
        self._graphs = {}
        self._state = self._step_state(STEP_INPUTS, out_columns=2)
        self._speculative = None

    def _make_requests(self, prompts, params) -> list[Request]:
        requests = super()._make_requests(prompts, params)
        default = SamplingParams()
        for r in requests:
            changed = [f"{name}={getattr(r.params, name)!r}" for name in RSD_ONLY_FIELDS
                       if getattr(r.params, name) != getattr(default, name)]
            if changed:
                raise ValueError(f"params of prompt {r.index} set {', '.join(changed)}: RSD-only fields have no "
                                 f"meaning for one model (leave them at their defaults); a Generator uses "
                                 f"temperature, top_p, top_k, seed, stop, stop_token_ids, max_new_tokens, ignore_eos")
        return requests

    def _caches(self):
        return (self.cache,)

    def _teacher_prompt(self, ids, index) -> list[int]:
        return []

    _outside = "is outside the model's vocabulary"

    def _vocab_rows(self) -> int:
        return self.model.config.vocab_size

    def _why_outside(self, token: int) -> str:
        return ""

    def _prefill(self, requests: list[Request]):
        """Fill the cache with each prompt but its last token, which the first decode step reads."""
        for r in requests:
            r.next_student_token, r.student_len = r.prompt_ids[-1], len(r.prompt_ids) - 1
        self._extend(self.model, self.cache, [(r.slot, r.prompt_ids[:-1]) for r in requests])

    def _commit_step(self, batch: list[Request], rows: list[list[float]]) -> list[Request]:
        """Append one sampled token per request (Engine._decode runs the step); returns those that finished."""
        finished = []
        for r, (token, logprob) in zip(batch, rows):
            token = int(token)
            if token < 0:  # flagged: this row's logits are not finite; the others go on
                self._fail(r, token)
                finished.append(r)
                continue
            r.result.token_ids.append(token)
            r.result.logprobs.append(logprob)
            r.student_len += 1
            r.next_student_token = token
            reason = self._finish_reason(r, extra_teacher=0)
            if reason:
                self._finalize(r, reason)
                finished.append(r)
        return finished

    def decode_step(self, inputs: dict[str, torch.Tensor], *, student_kv: int, teacher_kv: int | None = None):
        """Forward, raw log-softmax of the drawn token, fused sample: static shapes, no host syncs.
        ``inputs`` as Engine's (the model reads the student columns); ``teacher_kv`` is unused."""
        hidden = self.model(inputs["student_tokens"][:, None], inputs["student_pos"][:, None], self.cache,
                            inputs.get("slots"), student_kv)
        logits = self.model.logits(hidden[:, 0])
        uniforms = step_uniforms(inputs["seeds"], inputs["steps"], num_draws=FALLBACK_DRAW + 1)[:, FALLBACK_DRAW]
        token = sample_tokens(logits, uniforms, inputs["temperature"], inputs["top_k"], inputs["top_p"], self.mask,
                              backend=self.sampler, check_values=False)  # SamplingParams checked the rows
        picked = logits.gather(-1, token.clamp(min=0)[:, None])[:, 0]
        return token, picked - torch.logsumexp(logits, dim=-1)

    def _disturbs(self, row) -> bool:
        return False  # one model, no mapped tokens: the device's advance is the whole commit

    def _step_and_advance(self, inputs: dict[str, torch.Tensor], *, teacher_kv: int, student_kv: int,
                          out: torch.Tensor | None = None):
        token, logprob = self.decode_step(inputs, teacher_kv=teacher_kv, student_kv=student_kv)
        self._advance_student(inputs, token)
        return pack_outputs([token, logprob], out)

    def _fail(self, r: Request, flag: int):
        r.result.error = (f"the model ({self.model_path}) produced NaN or +inf logits at generation step "
                          f"{len(r.result.token_ids)} of prompt {r.index}; no token was sampled")
        self._finalize(r, "error")

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.model.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def score_batch(self, prompts, completions) -> list[list[float]]:
        """Teacher-forced log-probs of each completion token given the prompt and the tokens before it
        (strings or token-id lists), every cache slot scoring a sequence per forward (see scoring.py).
        It overwrites the cache: refused while a generate_iter of this generator is paused."""
        self._claim_caches("score_batch")
        if isinstance(prompts, (str, bytes)) or isinstance(completions, (str, bytes)):
            raise TypeError("prompts and completions must be lists (of strings or token-id lists)")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions: they must pair up")
        seqs, starts = [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids = self._tokenize(prompt, i)
            completion = self._completion_ids(completion, i)
            if len(ids) + len(completion) > self.max_seq_len:
                raise ValueError(f"prompt {i} with its completion has {len(ids) + len(completion)} tokens, more "
                                 f"than max_seq_len {self.max_seq_len}")
            seqs.append(ids + completion)
            starts.append(len(ids))
        try:
            return score_sequences(self.model, self.cache, seqs, starts)
        finally:
            for slot in range(min(len(seqs), self.cache.num_slots)):  # the slots scoring wrote
                self._release(slot)


def _sample_backend(sampler: str, device) -> str:
    """resolve_backend, where the chosen backend must also have its ``sample_tokens`` kernel: "auto"
    falls back to the reference where it does not; an explicit choice without one is refused."""
    backend = resolve_backend(sampler, device)
    if backend == "reference":
        return backend
    try:
        importlib.import_module(f"rsd_engine.sampling.{backend}_verify")
    except ImportError:
        if sampler == "auto":
            return "reference"
        raise ValueError(f"sampler={sampler!r}: this build has no {backend} sample_tokens kernel; "
                         f"use sampler='auto' or 'reference'") from None
    return backend


__all__ = ["Generator", "RSD_ONLY_FIELDS"]
