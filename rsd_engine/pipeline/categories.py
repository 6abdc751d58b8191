"""Where a sentence comes from (DESIGN §9): the project's working reading of arXiv 2512.20908.

pT, pS, pD are the sentence's probabilities (geometric means over its tokens) under the teacher,
the original student and the distilled student, each reading the same context. The paper writes
"pT >> pS" and gives no number, so ">>" is a rule with a margin, the user's choice:

    rule        a >> b when          default margin    option
    difference  a - b > beta         beta = 0.1        --rule difference --beta B   (the default rule)
    ratio       log a - log b > d    d = 0.5           --rule ratio --margin D

and with it

    teacher   pT >> pS                                        the teacher would say it, the student would not
    student   pS >> pT                                        the student's own phrasing
    boosted   neither, and pD >> max(pT, pS)                  in both, and distillation raised it
    shared    otherwise                                       in both, not raised

The difference rule never flags a sentence both models find unlikely (pT = 0.05 against pS =
0.001 is "shared" at beta 0.1); the ratio rule does (log 50 = 3.9 > 0.5). Since the
probabilities are per-token geometric means, d = 0.5 asks the teacher to give each token about
1.65 times the student's probability on average: near the difference rule's beta = 0.1 for
sentences at p around 0.2, and stricter than it above. A probability of 0 (an underflowed
geometric mean) has log -inf: any positive probability is >> it, and 0 is >> nothing.

Without a distilled model there is no "boosted". This is the one place these rules live: the
records, `rsd provenance-report`, `rsd select` and `rsd generate --select provenance` all
categorise through `Rule.categorize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CATEGORIES = ("teacher", "student", "shared", "boosted")
RULES = ("difference", "ratio")
DEFAULT_RULE = "difference"
DEFAULT_BETA = 0.1
DEFAULT_MARGIN = 0.5  # the ratio rule's, in nats of per-token log probability


@dataclass(frozen=True)
class Rule:
    """A reading of ">>": `name` in RULES and its margin (beta for difference, d for ratio)."""

    name: str = DEFAULT_RULE
    margin: float = DEFAULT_BETA

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"--rule = {self.name!r}: must be one of {', '.join(RULES)}")
        if self.name == "difference":
            check_beta(self.margin)
        else:
            check_margin(self.margin)
        object.__setattr__(self, "margin", float(self.margin))

    def much_greater(self, a: float, b: float) -> bool:
        if self.name == "difference":
            return a - b > self.margin
        if a <= 0.0:
            return False
        return b <= 0.0 or math.log(a) - math.log(b) > self.margin

    def categorize(self, p_teacher: float, p_student: float, p_distilled: float | None = None) -> str:
        if self.much_greater(p_teacher, p_student):
            return "teacher"
        if self.much_greater(p_student, p_teacher):
            return "student"
        if p_distilled is not None and self.much_greater(p_distilled, max(p_teacher, p_student)):
            return "boosted"
        return "shared"

    def describe(self) -> str:
        return f"difference, beta {self.margin:g}" if self.name == "difference" else f"ratio, margin {self.margin:g}"

    def as_dict(self) -> dict:
        return {"rule": self.name, "beta" if self.name == "difference" else "margin": self.margin}


def make_rule(rule: str = DEFAULT_RULE, *, beta: float | None = None, margin: float | None = None) -> Rule:
    """The rule the options name: --beta belongs to the difference rule, --margin to the ratio rule;
    giving the other rule's margin is refused rather than ignored."""
    if rule not in RULES:
        raise ValueError(f"--rule = {rule!r}: must be one of {', '.join(RULES)}")
    if rule == "difference":
        if margin is not None:
            raise ValueError(f"--margin = {margin!r} is the ratio rule's margin; --rule difference takes --beta "
                             f"(default {DEFAULT_BETA})")
        return Rule("difference", DEFAULT_BETA if beta is None else beta)
    if beta is not None:
        raise ValueError(f"--beta = {beta!r} is the difference rule's margin; --rule ratio takes --margin "
                         f"(default {DEFAULT_MARGIN})")
    return Rule("ratio", DEFAULT_MARGIN if margin is None else margin)


def options_rule(opts) -> Rule:
    """The rule of an options dataclass with `rule`, `beta` and `margin` fields; leaves the unused
    margin None and the used one filled in, so the settings manifest reads the same whichever way
    the default was reached."""
    rule = make_rule(opts.rule, beta=opts.beta, margin=opts.margin)
    opts.beta = rule.margin if rule.name == "difference" else None
    opts.margin = rule.margin if rule.name == "ratio" else None
    return rule


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        raise ValueError(f"--beta = {beta!r}: must be a number in (0, 1), the margin between sentence "
                         f"probabilities (default {DEFAULT_BETA})")
    return float(beta)


def check_margin(margin: float) -> float:
    if (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)
            or margin <= 0.0):
        raise ValueError(f"--margin = {margin!r}: must be a finite number > 0, the margin between log sentence "
                         f"probabilities (default {DEFAULT_MARGIN})")
    return float(margin)


def categorize(p_teacher: float, p_student: float, p_distilled: float | None = None, *,
               beta: float = DEFAULT_BETA, rule: Rule | None = None) -> str:
    """The category under `rule` (default: the difference rule at `beta`)."""
    return (rule or Rule("difference", beta)).categorize(p_teacher, p_student, p_distilled)


def is_teacher_originated(category: str) -> bool:
    """What teacher-guided selection counts."""
    return category == "teacher"
