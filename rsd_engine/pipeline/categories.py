"""Where a sentence comes from (DESIGN §9): the project's working reading of arXiv 2512.20908.

pT, pS, pD are the sentence's probabilities (geometric means over its tokens) under the teacher,
the original student and the distilled student, each reading the same context. With margin beta:

    teacher   pT - pS > beta                                  the teacher would say it, the student would not
    student   pS - pT > beta                                  the student's own phrasing
    boosted   |pT - pS| <= beta and pD - max(pT, pS) > beta   in both, and distillation raised it
    shared    otherwise                                       in both, not raised

Without a distilled model there is no "boosted". This is the one place these rules live.
"""

from __future__ import annotations

CATEGORIES = ("teacher", "student", "shared", "boosted")
DEFAULT_BETA = 0.1


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        raise ValueError(f"--beta = {beta!r}: must be a number in (0, 1), the margin between sentence "
                         f"probabilities (default {DEFAULT_BETA})")
    return float(beta)


def categorize(p_teacher: float, p_student: float, p_distilled: float | None = None, *,
               beta: float = DEFAULT_BETA) -> str:
    if p_teacher - p_student > beta:
        return "teacher"
    if p_student - p_teacher > beta:
        return "student"
    if p_distilled is not None and p_distilled - max(p_teacher, p_student) > beta:
        return "boosted"
    return "shared"


def is_teacher_originated(category: str) -> bool:
    """What teacher-guided selection counts."""
    return category == "teacher"
