"""From a problem's attempts to its one record: checks, the kept trace, its statistics.

An attempt passes the structural checks when its reasoning block is closed (if the prompt opened
one, or the model did), it ended with EOS, and its student-fallback share (over the tokens stored, EOS excluded) is at
most max_fallback. It is correct when its final answer (the last \\boxed{} after the reasoning)
verifies against the reference. Kept: the shortest attempt that is both ("solved"); for a problem
never solved, the first prefix_tokens tokens of attempt 0 ("prefix", UPFT: finish_reason "length" where
the cut shortens it, and cut back to whole characters, as is an unfinished record written whole that
--max-new-tokens cut); for a problem without reference answer, the
shortest structurally valid attempt that gave an answer, else the shortest valid one, else attempt 0
("unverified").

Stored traces exclude the final EOS token: `token_ids` decodes to `completion`, and the stats
are over exactly those tokens (the SFT form, to_sft, adds the EOS text back).
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

from rsd_engine.results import GenerationResult

from .answers import check_answer, extract_final_answer
from .data import Problem
from .prompts import THINK_CLOSE, THINK_OPEN, ChatPrompt

SUB_1PCT_LOGPROB = math.log(0.01)  # the paper's "student probability under 1%" line
STATUSES = ("solved", "prefix", "unverified")  # a record's status (select_trace)


@dataclass(frozen=True)
class Attempt:
    index: int
    result: GenerationResult
    token_ids: list[int]  # generated tokens without the final EOS
    final_answer: str | None
    correct: bool
    closed: bool
    eos: bool
    fallback_share: float
    valid: bool  # closed, eos and fallback_share <= max_fallback
    timed_out: bool = False  # math-verify did not finish comparing the answer in time: not correct, not known wrong


def check_attempt(index: int, result: GenerationResult, *, reference: str | None, thinking: bool,
                  max_fallback: float) -> Attempt:
    text, eos = result.text, result.finish_reason == "eos"
    closed = not _reasons(text, thinking) or THINK_CLOSE in text
    answer = final_answer(text, thinking)
    token_ids = result.token_ids[:-1] if eos else list(result.token_ids)
    # Over exactly the tokens the record stores (EOS excluded), as its stats are.
    kept = result.accepted[:len(token_ids)]
    student = len(kept) - sum(kept)
    fallback_share = student / len(kept) if kept else 0.0
    verdict = reference is not None and check_answer(answer, reference)
    # Exactly "at most": the share as a fraction against the limit as written (the float's shortest spelling; a
    # numpy float's too). 1 - 7/10 in floats is 0.30000000000000004, which failed --max-fallback 0.3 with 3 student
    # tokens of 10.
    valid = closed and eos and (not kept or Fraction(student, len(kept)) <= Fraction(str(float(max_fallback))))
    return Attempt(index, result, token_ids, answer, bool(verdict), closed, eos, fallback_share, valid,
                   timed_out=verdict is None)


def final_answer(text: str, thinking: bool) -> str | None:
    """The last \\boxed{} answer; after the reasoning block when the prompt opened one or the model did (an
    unclosed block has no answer: a box inside it is a step of the reasoning)."""
    if not _reasons(text, thinking):
        return extract_final_answer(text)
    return extract_final_answer(text[text.rindex(THINK_CLOSE):]) if THINK_CLOSE in text else None


def _reasons(text: str, thinking: bool) -> bool:
    """Whether the text holds a reasoning block: the prompt opened one, or the model opened its own."""
    return thinking or THINK_OPEN in text


def trace_stats(accepted, teacher_logprobs, student_logprobs) -> dict:
    """Tokens, acceptance rate, share of tokens under 1% student probability, mean surprisals (nats). The
    teacher's mean is over the tokens it scored (a mapped special token has no teacher log-prob: NaN)."""
    n = len(accepted)
    if n == 0:
        return {"tokens": 0, "acceptance_rate": 0.0, "sub_1pct_share": 0.0,
                "mean_student_surprisal": 0.0, "mean_teacher_surprisal": 0.0}
    scored = [lp for lp in teacher_logprobs if not math.isnan(lp)]
    return {
        "tokens": n,
        "acceptance_rate": sum(accepted) / n,
        "sub_1pct_share": sum(lp < SUB_1PCT_LOGPROB for lp in student_logprobs) / n,
        "mean_student_surprisal": -sum(student_logprobs) / n,
        "mean_teacher_surprisal": -sum(scored) / len(scored) if scored else 0.0,
    }


def select_trace(problem: Problem, prompt: ChatPrompt, attempts: list[Attempt], *, prefix_tokens: int,
                 decode, choose=None) -> dict:
    """The record of `problem` (see the module docstring); `decode(ids)` turns token ids into text.
    `choose(problem, solved)`, when given, picks among the solved attempts instead of the shortest and
    returns (attempt, fields added to the record) — `--select provenance`."""
    solved = [a for a in attempts if a.valid and a.correct]
    valid = [a for a in attempts if a.valid]
    extra = {}
    if problem.answer is None:
        # An attempt that gave an answer over one that ended without any (a short "...</think>" and EOS).
        answered = [a for a in valid if a.final_answer is not None]
        status, kept = "unverified", min(answered or valid, key=_length) if valid else attempts[0]
    elif solved:
        status, kept = "solved", min(solved, key=_length)
        if choose is not None:
            kept, extra = choose(problem, solved)
    else:
        status, kept = "prefix", attempts[0]
    r = kept.result
    ids, completion, finish_reason = kept.token_ids, r.text, r.finish_reason
    if status == "prefix" and len(ids) > prefix_tokens:
        ids, completion = _prefix(kept, prefix_tokens, decode)
        finish_reason = "length"  # cut by --prefix-tokens: not the whole attempt, whatever ended it
    elif (status == "prefix" or not kept.valid) and not kept.eos:
        ids, completion = _whole_characters(ids, completion, decode)  # an unfinished record, written whole
    n = len(ids)
    return {
        "id": problem.id,
        "question": problem.question,
        "answer": problem.answer,
        "prompt": prompt.text,
        "completion": completion,
        "token_ids": list(ids),
        "status": status,
        "attempts": len(attempts),
        "num_correct": sum(a.correct for a in attempts),
        "num_valid": len(valid),
        "kept_attempt": kept.index,
        "final_answer": None if status == "prefix" else kept.final_answer,
        "finish_reason": finish_reason,
        "seed": r.seed,
        "stats": trace_stats(r.accepted[:n], r.teacher_logprobs[:n], r.student_logprobs[:n]),
        **({"grading_timed_out": timed_out} if (timed_out := sum(a.timed_out for a in attempts)) else {}),
        **extra,
    }


def _prefix(attempt: Attempt, prefix_tokens: int, decode) -> tuple[list[int], str]:
    """The first prefix_tokens tokens of the attempt and their text, fewer where the cut falls inside a
    character spelled by several byte tokens (its text would end in a U+FFFD the model never wrote)."""
    ids = attempt.token_ids[:prefix_tokens]
    text = decode(ids)
    while ids and text.endswith("\ufffd") and not attempt.result.text.startswith(text):
        ids = ids[:-1]
        text = decode(ids)
    return ids, text


def _whole_characters(ids: list[int], text: str, decode) -> tuple[list[int], str]:
    """An attempt cut by --max-new-tokens inside a character spelled by several byte tokens ends in a U+FFFD
    the model never wrote: its last (at most 3) tokens are dropped down to a whole character. A U+FFFD the
    model did write as its last character goes too (it cannot be told apart; the record is a prefix)."""
    for drop in range(1, min(3, len(ids)) + 1) if text.endswith("\ufffd") else ():
        shorter = decode(ids[:-drop])
        if not shorter.endswith("\ufffd"):
            return ids[:-drop], shorter
    return ids, text


def _length(attempt: Attempt) -> tuple[int, int]:
    return len(attempt.token_ids), attempt.index  # ties: the earlier attempt


def to_sft(record: dict, prompt: ChatPrompt, tokenizer, prompt_ids: list[int], ended: list[int]) -> dict:
    """The SFT form of a finished record: TRL's prompt-completion, text and tokens. `prompt` is the text the
    student was given (chat template and opened reasoning block included), `completion` what it wrote after
    it (sft_completion). Chat messages would go through the student's template again, and reasoning
    templates rewrite the assistant turn (Qwen3's re-spaces the reasoning block, DeepSeek-R1-Distill's drops
    it). The question and reference answer ride along (resumes check them).

    The text alone does not give back the tokens: RSD mixes the teacher's tokens with the student's, and
    "answer" written as "ans"+"wer", or "</think>" spelled in pieces, tokenises otherwise; a newline after
    the prompt's last one may merge with it; a tokenizer that adds a BOS adds a second before the template's.
    So the record also carries the tokens as TRL's tokenised form: `input_ids`, the prompt's ids as the
    engine read them, the ids the student wrote (`ended`, its EOS last, as the jsonl record's `token_ids`)
    and the EOS the completion ends with; `completion_mask`, 1 on the completion's ids. TRL's SFTTrainer
    takes a dataset with `input_ids` as tokenised (it trains on these ids, the loss on the completion) and
    the text fields stay for other trainers and for reading."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token is not None else ended[-1]
    completion_ids = list(ended[:-1]) + [eos]
    return {"id": record["id"], "status": record["status"], "question": record["question"],
            "answer": record["answer"], "prompt": prompt.text,
            "completion": sft_completion(tokenizer, prompt_ids, ended),
            "input_ids": list(prompt_ids) + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def sft_completion(tokenizer, prompt_ids: list[int], token_ids: list[int]) -> str:
    """What a finished attempt (`token_ids`, its EOS last) wrote after its prompt, as text that continues the
    prompt's: decoded in context, since a sentencepiece decoder drops the space of a text's first token
    (Llama-2's "▁The" after "[/INST]"), then the tokenizer's EOS token, which TRL's SFTTrainer ends a
    completion with (and adds where it is missing: an attempt that stopped on another of the model's EOS ids,
    Qwen's <|endoftext|> for <|im_end|>, would end with two)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    head, whole = decode(list(prompt_ids)), decode(list(prompt_ids) + list(token_ids[:-1]))
    text = whole[len(head):] if whole.startswith(head) else decode(token_ids[:-1])
    return text + (tokenizer.eos_token or decode(token_ids[-1:]))
