"""One model reading a question and a response, each in its own words: the question through the
model's own chat template, the response as plain text tokenised by the model's own tokenizer.

A Reader gives the log-probability of every response token given everything before it, and each
token's character span in the response, which is what makes sentences comparable across models
with different tokenizers (see sentences.py). The model is loaded only when first needed, so a
whole dataset can be checked (lengths, unreadable text) before any weights are read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from .prompts import THINK_CLOSE, THINK_OPEN, ChatTemplateError, build_prompt, dated_template


class Unreadable(ValueError):
    """This model cannot read this text faithfully (unknown tokens, ids beyond its embedding)."""


@dataclass
class Reading:
    prompt_ids: list[int]
    response_ids: list[int]
    offsets: list[tuple[int, int]]  # per response token: its characters in the response

    def __len__(self):
        return len(self.prompt_ids) + len(self.response_ids)


class Reader:
    def __init__(self, role: str, folder, *, device="auto", dtype="auto", model=None, tokenizer=None):
        from rsd_engine.models import load_config
        from rsd_engine.tokens import load_tokenizer

        self.role, self.folder = role, Path(folder)
        if model is None and not self.folder.is_dir():
            raise FileNotFoundError(f"--{role} model folder not found: {folder}")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"the {role}'s tokenizer in {folder} is a slow (Python) tokenizer; provenance needs "
                             f"character offsets, which only fast tokenizers (tokenizer.json) give")
        self.config = model.config if model is not None else load_config(folder)
        self.device, self.dtype = device, dtype
        self._model, self._cache, self.max_seq_len = model, None, None
        self._prompt = functools.lru_cache(maxsize=64)(self._prompt_ids)

    @functools.cached_property
    def markers(self) -> frozenset[str]:
        """The tokenizer's special and added tokens that are markup, not words (`<|im_end|>`; an
        added "hello" or a run of spaces is text), and the reasoning markers `<think>` `</think>`
        even where the tokenizer has no such token: records of a reasoning model hold them as text."""
        tokens = {THINK_OPEN, THINK_CLOSE} | set(self.tokenizer.all_special_tokens) | set(
            self.tokenizer.get_added_vocab())
        return frozenset(t for t in tokens if t.strip() and not t.strip().isalnum())

    @property
    def context(self) -> int:
        return self.config.max_position_embeddings

    def read(self, question: str, response: str, system: str, row=None) -> Reading:
        """Token ids and offsets of the prompt and response; Unreadable when the tokenizer cannot
        represent the text. A chat template that fails on the question names `row`, the id of its row."""
        try:
            response.encode("utf-8")
        except UnicodeEncodeError as err:  # the tokenizer would raise a bare TypeError
            raise Unreadable(f"the response is not valid Unicode: {response[err.start]!r} at character {err.start} "
                             f"is a lone surrogate") from None
        try:
            prompt_ids, opened = self._prompt(question, system)
        except ChatTemplateError as err:
            raise err.of_row(row) from None
        # A response that opens the thinking block this model's prompt already opened (a record of other
        # tools: rsd's own records start after it) is read after it, not as a second one; its offsets stay
        # the response's (the marker is no sentence).
        skip = len(response) - len(strip_think_open(response)) if opened else 0
        # Tokenised alone, as rsd generate and eval decode what a model wrote (alone). For a tokenizer that starts
        # every text with a space (Llama-2's) that is the model's own first token after a chat template's [/INST]
        # ("▁The"), but not after a plain prompt's blank line ("The"); the text alone cannot say which it was.
        enc = self.tokenizer(response[skip:], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [(a + skip, b + skip) for a, b in enc["offset_mapping"]]
        self._check_ids(ids, offsets, response, "response")
        return Reading(prompt_ids, ids, offsets)

    def _prompt_ids(self, question: str, system: str) -> tuple[list[int], bool]:
        """The prompt's ids, and whether it ends with an opened thinking block."""
        prompt = build_prompt(self.tokenizer, question, system)
        enc = self.tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
        self._check_ids(list(enc["input_ids"]), enc["offset_mapping"], prompt.text, "question in its chat template")
        return list(enc["input_ids"]), prompt.thinking

    def _check_ids(self, ids, offsets, text, what):
        unk = self.tokenizer.unk_token_id
        for tok, (a, b) in zip(ids, offsets):
            if unk is not None and tok == unk:
                raise Unreadable(f"the {self.role}'s tokenizer cannot read the {what}: {text[a:b]!r} at character "
                                 f"{a} becomes the unknown token")
            if tok >= self.config.vocab_size:
                raise Unreadable(f"the {self.role}'s tokenizer gives id {tok} for {text[a:b]!r}, beyond the "
                                 f"model's {self.config.vocab_size} embedding rows")

    def allocate(self, max_seq_len: int, slots: int = 1) -> None:
        """Load the model (if not given) and a cache of `slots` sequences of max_seq_len positions."""
        from rsd_engine.models import load_model
        from rsd_engine.runtime import resolve_device, resolve_dtype

        if self._model is None:
            device = resolve_device(self.device)
            self._model = load_model(self.folder, dtype=resolve_dtype(self.dtype, device), device=device)
        if self._cache is None or (self.max_seq_len, self._cache.num_slots) != (max_seq_len, slots):
            self._cache = None  # free the old one first
            self._cache = self._model.new_cache(slots, max_seq_len)
            self.max_seq_len = max_seq_len

    def logprobs(self, readings: list[Reading]) -> list[list[float]]:
        """Per reading: log p(token | everything before it) for each response token, a batch of
        readings per forward."""
        from rsd_engine.scoring import score_sequences

        for r in readings:
            if len(r) > self.max_seq_len:
                raise ValueError(f"{len(r)} tokens exceed the {self.role}'s max_seq_len {self.max_seq_len}")
        return score_sequences(self._model, self._cache, [r.prompt_ids + r.response_ids for r in readings],
                               [len(r.prompt_ids) for r in readings])


def strip_think_open(text: str) -> str:
    """The assistant turn of a chat record without the thinking block its prompt opened: each model
    opens (or not) its own block through its own template."""
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
        return text[1:] if text.startswith("\n") else text
    return text


def other_prompts(responses, reader: Reader) -> list[str]:
    """Ids of the responses whose row holds the prompt they were written after (a "prompt" field, as rsd generate
    writes it) where that is not the prompt `reader` (the student's) reads them after here: another --system-prompt
    or chat template than the run that wrote them, or an older rsd's prompt rules."""
    from .evaluate import is_eval_record

    if dated_template(reader.tokenizer):  # (today's date in every prompt: no telling another prompt from another day)
        return []
    ids, built = [], {}
    for r in responses:
        held = r.row.get("prompt")
        if not isinstance(held, str) or held == r.question:  # (TRL rows read with --question-field prompt)
            continue
        if is_eval_record(r.row):  # the prompt of the model rsd eval ran (a teacher's, a distilled model's template)
            continue
        if (r.question, r.system) not in built:  # a problem's candidates share it
            built[r.question, r.system] = build_prompt(reader.tokenizer, r.question, r.system, row=r.id).text
        if held != built[r.question, r.system]:
            ids.append(r.id)
    return list(dict.fromkeys(ids))


def other_prompts_warning(ids: list[str]) -> str:
    shown = ", ".join(ids[:5]) + (f", and {len(ids) - 5} more" if len(ids) > 5 else "")
    return (f"warning: {len(ids)} problems' responses were written after another prompt than the student reads them "
            f"after here (their \"prompt\" field; another --system-prompt or chat template?): {shown}; they are "
            f"scored after the prompt built now")
