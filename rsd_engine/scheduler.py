"""Continuous batching: a finished slot takes the next waiting request at once."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .params import SamplingParams
from .results import GenerationResult


@dataclass
class Request:
    index: int  # position in the caller's prompt list
    prompt_ids: list[int]  # student space
    teacher_prompt_ids: list[int]
    params: SamplingParams
    seed: int
    result: GenerationResult
    slot: int = -1
    student_len: int = 0  # tokens in the student's cache
    teacher_len: int = 0
    next_student_token: int = 0  # fed to the student at the next decode step
    next_teacher_token: int = 0
    stop_scan_from: int = 0  # characters of text already searched for stop strings
    cut_at_stop: bool = False  # result.text is already the text before a stop string (maybe "")


@dataclass
class Scheduler:
    num_slots: int
    waiting: deque = field(default_factory=deque)
    running: dict = field(default_factory=dict)  # slot -> Request

    def __post_init__(self):
        self.free_slots = list(range(self.num_slots - 1, -1, -1))

    def add(self, request: Request):
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            self.running[request.slot] = request
            admitted.append(request)
        return admitted

    def finish(self, request: Request):
        del self.running[request.slot]
        self.free_slots.append(request.slot)

    def batch(self) -> list[Request]:
        return [self.running[s] for s in sorted(self.running)]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
