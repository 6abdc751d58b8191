"""What the engine returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationResult:
    """One RSD trace (Engine) or one model's sample (Generator). RSD: ``accepted[i]`` says whether token i
    is the teacher's proposal (True) or the student's fallback (False), with the token's log-prob under
    each model; ``logprobs`` stays empty. Generator: ``logprobs[i]`` is token i's log-prob under the
    model; ``accepted`` and the per-model lists stay empty. Log-probs are raw (temperature 1, untruncated). A student
    token the teacher reads as several tokens (a mapped special token, tokens.py) has a NaN teacher log-prob: one
    decode step does not score all its pieces (``Engine.score_batch`` gives their sum)."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    accepted: list[bool] = field(default_factory=list)
    teacher_logprobs: list[float] = field(default_factory=list)
    student_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""  # "eos", "stop", "length", or "error" (then ``error`` says what went wrong)
    seed: int = 0
    error: str = ""
    teacher_passes: int = 0  # teacher decode/verify forwards that produced token_ids (prefill excluded)
    logprobs: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0


@dataclass
class ScoreResult:
    """Teacher-forced log-probs of every completion token given its prefix, under each model."""

    teacher_logprobs: list[float]
    student_logprobs: list[float]
