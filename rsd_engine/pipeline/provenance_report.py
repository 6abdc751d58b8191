"""What `rsd provenance` reports (category shares per response and overall, a stacked-bar plot),
and `rsd provenance-report`: the analysis the papers draw, from the stored sentence probabilities,
under any category rule, without running a model.

The analysis, over the responses of a `rsd provenance` output (the newest lines of each (id,
sample); responses cut off by the length limit left out unless asked for, responses missing a sentence line
left out and named):
- category shares over all sentences, over the sentences of correct and of incorrect answers, and
  per response;
- shares by relative position: sentence i of n sits at (i + 0.5) / n and falls in one of `bins`
  equal bins (deciles); a bin's share pools the sentences of all responses of a group there;
- the area between the teacher-share curves of correct and incorrect answers over position [0, 1],
  signed (correct minus incorrect): the mean over bins of the difference, over the bins both
  groups have sentences in;
- the point-biserial correlation between a response's teacher share and its correctness (Pearson's
  r on 0/1), over responses;
- for both, a percentile-bootstrap interval resampling problems (ids) with all their responses,
  since samples of one problem are not independent; numpy's generator with a fixed seed, so a
  rerun gives the same interval.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .categories import CATEGORIES, Rule
from .records import read_records, same_record
from .output_paths import check_not_input, check_plot_format
from .reports import check_plot_out, check_report_out, plot_file, save_plot, write_report

SHOWN_RESPONSES = 20  # rows of the printed per-response table
SHOWN_INCOMPLETE = 5  # responses named as left out for missing sentence lines
PLOTTED_RESPONSES = 40
COLOURS = {"teacher": "#d62728", "student": "#1f77b4", "shared": "#bbbbbb", "boosted": "#2ca02c"}


def category_shares(lines: list[dict]) -> dict:
    """Per response (in order of appearance) and overall: sentence count and share per category."""
    groups: dict[tuple, list[str]] = {}
    for line in lines:
        groups.setdefault((str(line["id"]), line.get("sample", 0)), []).append(line["category"])
    several = any(sample for _, sample in groups)  # name responses id/sample only when ids repeat
    per_response = [_shares(f"{rid}/{sample}" if several else rid, cats) for (rid, sample), cats in groups.items()]
    overall = _shares("all", [c for cats in groups.values() for c in cats])
    return {"responses": per_response, "overall": overall}


def _shares(name: str, categories: list[str]) -> dict:
    n = len(categories)
    return {"name": name, "sentences": n, **{c: categories.count(c) / n if n else 0.0 for c in CATEGORIES}}


def format_shares(report: dict, *, distilled: bool, shown: int = SHOWN_RESPONSES) -> str:
    cats = [c for c in CATEGORIES if distilled or c != "boosted"]
    rows = report["responses"]
    width = max([8, *(len(r["name"]) for r in rows[:shown])])
    head = f"{'response':<{width}} {'sentences':>9}" + "".join(f" {c:>8}" for c in cats)
    lines = [head, "-" * len(head)]
    for r in rows[:shown]:
        lines.append(_row(r, cats, width))
    if len(rows) > shown:
        lines.append(f"... {len(rows) - shown} more responses")
    lines.append("-" * len(head))
    lines.append(_row(report["overall"], cats, width))
    return "\n".join(lines)


def _row(r: dict, cats, width) -> str:
    return f"{r['name']:<{width}} {r['sentences']:>9}" + "".join(f" {r[c]:>8.1%}" for c in cats)


def plot_shares(report: dict, path, *, distilled: bool) -> None:
    """Stacked bars of category shares: the first PLOTTED_RESPONSES responses, then all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c in CATEGORIES if distilled or c != "boosted"]
    rows = report["responses"][:PLOTTED_RESPONSES] + [report["overall"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(rows) + 2), 4))
    bottom = [0.0] * len(rows)
    for c in cats:
        values = [r[c] for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, color=COLOURS[c], label=c)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of sentences")
    shown = len(rows) - 1
    title = "sentence provenance per response" + (f" (first {shown} of {len(report['responses'])})"
                                                  if len(report["responses"]) > shown else "")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_plot(fig, path, "provenance")
    plt.close(fig)


# ---- `rsd provenance-report`: the papers' analysis from stored sentence probabilities ----------

REQUIRED = ("id", "index", "sentences", "p_teacher", "p_student")
DEFAULT_BINS, DEFAULT_RESAMPLES, DEFAULT_LEVEL = 10, 1000, 0.95


@dataclass
class ScoredResponse:
    id: str
    sample: int
    categories: list[str]
    correct: bool | None  # None: the input did not say
    finish_reason: str | None

    @property
    def teacher_share(self) -> float:
        return self.categories.count("teacher") / len(self.categories)


def read_sentences(path, rule: Rule) -> tuple[list[ScoredResponse], dict]:
    """The responses of a `rsd provenance` output, re-categorised under `rule` from their stored
    probabilities: of each (id, sample) the newest complete version (provenance.current_sentences:
    a response traced again after its text changed is appended later; a torn one is left out, and a response
    without a complete version is counted and named in "incomplete", one read from an older version in
    "older_version"). Refuses lines without the fields the analysis
    needs, ids written two ways that read as one (1 and "1"), and two copies of a line of one version that differ."""
    from .provenance import current_sentences

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (give the --out of rsd provenance)" if not Path(path).exists()
                                else f"{path} is not a file (give the --out of rsd provenance)")
    lines = read_records(path)
    if not lines:
        raise ValueError(f"{path}: no sentence lines (is it the --out of rsd provenance?)")
    for number, line in enumerate(lines, 1):
        _check_line(path, number, line)
    _check_ids(path, lines)
    numbers = {id(line): number for number, line in enumerate(lines, 1)}  # current_sentences keeps the lines
    by_index: dict[tuple[str, int], dict[int, dict]] = {}
    for line in current_sentences(lines):  # wherever its lines lie
        held = by_index.setdefault((str(line["id"]), line.get("sample", 0)), {})
        earlier = held.get(line["index"])
        # A version's line is written once: a copy is the same line (to float rounding), one that differs is not.
        # Lines of an older rsd without a text hash cannot tell versions apart; there the later copy replaces the
        # earlier.
        if earlier is not None and not same_record(earlier, line) and line.get("response_hash") is not None:
            differ = ", ".join(name for name in dict.fromkeys([*earlier, *line]) if earlier.get(name) != line.get(name))
            raise ValueError(f"{path}: lines {numbers[id(earlier)]} and {numbers[id(line)]} are both sentence "
                             f"{line['index']} of id {line['id']} sample {line.get('sample', 0)} (one version of its "
                             f"text) but differ in {differ}: the file was edited or joined from other runs; keep one "
                             f"of the two, or trace the responses again into another --out")
        held[line["index"]] = line
    groups = {key: [lines_[i] for i in sorted(lines_)] for key, lines_ in by_index.items()}
    if not groups:
        raise ValueError(f"{path}: no response has all of its sentence lines (the {len(lines)} lines belong to "
                         "versions cut off mid-write): rerun rsd provenance with the same --out to finish them")
    responses, changed = [], 0
    for (rid, sample), group in groups.items():
        cats = [rule.categorize(g["p_teacher"], g["p_student"], g.get("p_distilled")) for g in group]
        changed += sum(c != g.get("category") for c, g in zip(cats, group))
        first = group[0]
        correct = first.get("correct")
        finish = "length" if first.get("truncated") else first.get("finish_reason")
        responses.append(ScoredResponse(rid, sample, cats, correct if isinstance(correct, bool) else None, finish))
    incomplete = [f"{rid}/{sample}" for rid, sample in dict.fromkeys((str(line["id"]), line.get("sample", 0))
                                                                      for line in lines) if (rid, sample) not in groups]
    # A response traced again (its text changed) whose newer version was cut short is read from its older one.
    newest: dict[tuple[str, int], int] = {}
    for line in lines:
        key = (str(line["id"]), line.get("sample", 0))
        newest[key] = max(newest.get(key, 1), line.get("version", 1))
    older = [f"{rid}/{sample}" for (rid, sample), group in groups.items()
             if newest[rid, sample] > group[0].get("version", 1)]
    return responses, {"lines": len(lines), "lines_used": sum(map(len, groups.values())), "recategorised": changed,
                       "incomplete": {"count": len(incomplete), "first": incomplete[:SHOWN_INCOMPLETE]},
                       "older_version": {"count": len(older), "first": older[:SHOWN_INCOMPLETE]}}


def _check_ids(path, lines):
    """Refuses ids written two ways that read as one (1 and "1"): rsd provenance writes every id as text, so these
    are lines of two problems that would be taken as one's (of one sample, as one response's)."""
    first: dict[str, tuple[int, object]] = {}
    for number, line in enumerate(lines, 1):
        rid = line["id"]
        first_number, first_id = first.setdefault(str(rid), (number, rid))
        if type(first_id) is not type(rid):
            raise ValueError(f"{path}: lines {first_number} and {number} give id {first_id!r} and {rid!r}, which read "
                             f"as one id: the lines of two problems would be mixed; rsd provenance writes every id as "
                             f"text, so the file was made or joined elsewhere: give each problem its own id")


def _check_line(path, number, line):
    for name in REQUIRED:
        if name not in line:
            raise ValueError(f"{path} line {number}: no {name!r} field; provenance-report reads the output of rsd "
                             f"provenance (id, sample, index, p_teacher, p_student[, p_distilled], correct)")
    for name in ("p_teacher", "p_student", "p_distilled"):
        p = line.get(name)
        if (p is not None or name != "p_distilled") and (
                isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0):
            raise ValueError(f"{path} line {number}: {name} = {p!r}, not a probability in [0, 1]")
    if isinstance(line["index"], bool) or not isinstance(line["index"], int):
        raise ValueError(f"{path} line {number}: index = {line['index']!r}, not an integer")


def analyse(responses: list[ScoredResponse], *, bins: int = DEFAULT_BINS, resamples: int = DEFAULT_RESAMPLES,
            seed: int = 0, level: float = DEFAULT_LEVEL, include_truncated: bool = False) -> dict:
    """Shares overall and per response; shares by relative position for correct and incorrect
    answers; the area between their teacher-share curves and the correlation of a response's
    teacher share with its correctness, each with a percentile-bootstrap interval over problems."""
    truncated = [r for r in responses if r.finish_reason == "length"]
    kept = responses if include_truncated else [r for r in responses if r.finish_reason != "length"]
    if not kept:
        raise ValueError(f"all {len(responses)} responses were cut off by the length limit (finish_reason "
                         f"'length'); pass --include-truncated to analyse them anyway")
    judged = [r for r in kept if r.correct is not None]
    report = {
        "responses": len(kept),
        "sentences": sum(len(r.categories) for r in kept),
        "truncated": {"count": len(truncated), "included": include_truncated},
        "unjudged": len(kept) - len(judged),
        "shares": {"all": _shares("all", [c for r in kept for c in r.categories])},
        "per_response": [{"id": r.id, "sample": r.sample, "correct": r.correct, "finish_reason": r.finish_reason,
                          **_shares(f"{r.id}/{r.sample}", r.categories)} for r in kept],
    }
    for name, flag in (("correct", True), ("incorrect", False)):
        report["shares"][name] = _shares(name, [c for r in judged if r.correct is flag for c in r.categories])
    curves = PositionCounts(judged, bins)
    report["by_position"] = curves.shares()
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(curves.problems, np.full(curves.problems, 1.0 / curves.problems),
                              size=resamples) if curves.problems else np.zeros((resamples, 0))
    report["teacher_area"] = _estimate(curves.area(np.ones((1, curves.problems)))[0], curves.area(weights),
                                       level, resamples, seed)
    report["teacher_area"]["deciles_compared" if bins == 10 else "bins_compared"] = curves.compared()
    report["correlation"] = _estimate(curves.correlation(np.ones((1, curves.problems)))[0],
                                      curves.correlation(weights), level, resamples, seed)
    report["correlation"]["responses"] = len(judged)
    both = {r.correct for r in judged} == {True, False}
    if report["teacher_area"]["value"] is None:
        report["teacher_area"]["why"] = ("no bin holds sentences of both" if both else
                                         "needs correct and incorrect answers")
    if report["correlation"]["value"] is None:
        report["correlation"]["why"] = ("the teacher share is the same in every response" if both else
                                        "needs correct and incorrect answers")
    return report


def position_bin(i: int, n: int, bins: int) -> int:
    """The bin of sentence i of n: floor((i + 1/2) / n * bins), exactly."""
    return min((2 * i + 1) * bins // (2 * n), bins - 1)


class PositionCounts:
    """Counts per problem, correctness and position bin: what both the estimates and their
    bootstrap replicates are computed from (a replicate weighs each problem by how often it was
    drawn, so samples of one problem move together)."""

    def __init__(self, responses: list[ScoredResponse], bins: int):
        self.bins = bins
        ids = sorted({r.id for r in responses})  # id order: replicates do not depend on the order of the input
        self.problems = len(ids)
        place = {pid: k for k, pid in enumerate(ids)}
        # [problem, correct?, category, bin]
        self.counts = np.zeros((len(ids), 2, len(CATEGORIES), bins))
        for r in responses:
            n = len(r.categories)
            for i, c in enumerate(r.categories):
                # A sentence sits at its middle, (i + 1/2) / n, in half-open bins [b / bins, (b + 1) / bins);
                # in integers, as float rounding puts a middle that lands on an edge in the bin below.
                b = position_bin(i, n, bins)
                self.counts[place[r.id], int(r.correct), CATEGORIES.index(c), b] += 1
        self.owner = np.array([place[r.id] for r in responses], dtype=int)
        self.share = np.array([r.teacher_share for r in responses])
        self.correct = np.array([float(r.correct) for r in responses])

    def _curves(self, weights):
        """Teacher share per bin, [replicate, correct?, bin]; NaN where a group has no sentence."""
        teacher = np.einsum("wp,pgb->wgb", weights, self.counts[:, :, CATEGORIES.index("teacher"), :])
        total = np.einsum("wp,pgb->wgb", weights, self.counts.sum(axis=2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, teacher / np.where(total > 0, total, 1), np.nan)

    def shares(self) -> dict:
        totals = self.counts.sum(axis=(0, 2))  # [correct?, bin]
        out = {"bins": self.bins, "position": [(b + 0.5) / self.bins for b in range(self.bins)]}
        for name, g in (("correct", 1), ("incorrect", 0)):
            out[name] = {"sentences": totals[g].astype(int).tolist()}
            for k, c in enumerate(CATEGORIES):
                counts = self.counts[:, g, k, :].sum(axis=0)
                out[name][c] = [float(x / t) if t else None for x, t in zip(counts, totals[g])]
        return out

    def _compared(self) -> np.ndarray:
        totals = self.counts.sum(axis=(0, 2))
        return (totals[0] > 0) & (totals[1] > 0)

    def compared(self) -> int:
        return int(self._compared().sum())

    def area(self, weights) -> np.ndarray:
        """Per replicate: the signed area between the correct and the incorrect teacher-share curves
        over relative position [0, 1], i.e. the mean over bins of (correct - incorrect), taken over
        the bins both groups have sentences in in the whole data (all of [0, 1] only when every bin is compared).
        The same bins in every replicate: one missing a sentence of either group in one of them is NaN (not
        defined), never a mean over fewer bins, which would be another quantity. NaN when no bin is compared."""
        compared = self._compared()
        if not compared.any():
            return np.full(len(weights), np.nan)
        curves = self._curves(weights)
        gap = curves[:, 1, compared] - curves[:, 0, compared]
        return gap.mean(axis=1)

    def correlation(self, weights) -> np.ndarray:
        """Per replicate: Pearson's r between a response's teacher share and its correctness (0/1),
        which is the point-biserial correlation. NaN when either does not vary."""
        if not len(self.share):
            return np.full(len(weights), np.nan)
        w = weights[:, self.owner]
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mx, my = (w @ self.share) / total, (w @ self.correct) / total
            cov = (w @ (self.share * self.correct)) / total - mx * my
            vx = (w @ self.share ** 2) / total - mx ** 2
            vy = (w @ self.correct ** 2) / total - my ** 2
            ok = (vx > 1e-12) & (vy > 1e-12)
            return np.where(ok, cov / np.sqrt(np.where(ok, vx * vy, 1.0)), np.nan)


def _estimate(value, replicates, level, resamples, seed) -> dict:
    finite = replicates[np.isfinite(replicates)]
    # A resample without a correct or an incorrect answer has no value: it is left out, and the
    # count of those kept says how far to trust the interval.
    if not np.isfinite(value):
        return {"value": None, "interval": None, "level": level, "resamples": 0, "resamples_drawn": resamples,
                "seed": seed}
    tail = (1.0 - level) / 2 * 100
    interval = [float(x) for x in np.percentile(finite, [tail, 100 - tail])] if len(finite) else None
    return {"value": float(value), "interval": interval, "level": level, "resamples": int(len(finite)),
            "resamples_drawn": resamples, "seed": seed}


def run_report(sentences, *, rule: Rule, out=None, plot=None, bins: int = DEFAULT_BINS,
               resamples: int = DEFAULT_RESAMPLES, seed: int = 0, include_truncated: bool = False,
               log=print) -> dict:
    """`rsd provenance-report`: read, re-categorise, analyse; write the JSON report and the plot."""
    plot = plot_file(plot)
    check_not_input({"the sentences file": sentences}, {"--out": out, "--plot": plot}, apart=("--out", "--plot"))
    check_plot_format(plot)
    check_report_out(out, "provenance-report")
    check_plot_out(plot, "provenance-report")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"--bins = {bins!r}: must be an integer >= 1")
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"--resamples = {resamples!r}: must be an integer >= 1")
    responses, read = read_sentences(sentences, rule)
    report = {"source": str(sentences), "rule": rule.as_dict(), **read,
              **analyse(responses, bins=bins, resamples=resamples, seed=seed, include_truncated=include_truncated)}
    distilled = any(r.get("boosted") for r in report["per_response"])
    log(format_report(report, distilled=distilled))
    if out is not None:
        write_report(out, "provenance-report", report, ensure_ascii=False)
        log(f"report: {out}")
    if plot is not None:
        plot_report(report, plot)
        log(f"plot: {plot}")
    return report


def format_report(report: dict, *, distilled: bool = False) -> str:
    cats = [c for c in CATEGORIES if distilled or c != "boosted"]
    rule = report["rule"]
    lines = [f"{report['source']}: {report['responses']} responses, {report['sentences']} sentences, rule "
             f"{rule['rule']} {'beta' if 'beta' in rule else 'margin'} {rule.get('beta', rule.get('margin')):g} "
             f"({report['recategorised']} sentences change category from the stored one)"]
    t = report["truncated"]
    if t["count"]:
        lines.append(f"cut off by the length limit: {t['count']} responses "
                     f"({'included' if t['included'] else 'left out; --include-truncated to keep them'})")
    gone = report.get("incomplete")  # read_sentences says it; a report analysed from other responses may not
    if gone and gone["count"]:
        more = ", ..." if gone["count"] > len(gone["first"]) else ""
        lines.append(f"left out, some of their sentence lines missing: {gone['count']} responses "
                     f"({', '.join(gone['first'])}{more}); a run cut short: rerun rsd provenance with the same --out "
                     f"to finish them")
    older = report.get("older_version")
    if older and older["count"]:
        more = ", ..." if older["count"] > len(older["first"]) else ""
        lines.append(f"read from an older version, the newest one's sentence lines incomplete: {older['count']} "
                     f"responses ({', '.join(older['first'])}{more}); their texts changed since: rerun rsd "
                     f"provenance with the same --out to trace them as they are now")
    if report["unjudged"]:
        lines.append(f"without a 'correct' field: {report['unjudged']} responses (left out of the split by "
                     f"correctness)")
    width = 10
    head = f"{'':<{width}} {'sentences':>9}" + "".join(f" {c:>8}" for c in cats)
    lines += [head, "-" * len(head)]
    lines += [_row({**s, "name": name}, cats, width) for name, s in report["shares"].items()]
    pos = report["by_position"]
    lines.append(f"teacher share by position ({pos['bins']} bins, start -> end of the response):")
    for name in ("correct", "incorrect"):
        values = " ".join("   -  " if v is None else f"{v:6.1%}" for v in pos[name]["teacher"])
        lines.append(f"  {name:<9} {values}")
    area = report["teacher_area"]
    compared = area.get("deciles_compared", area.get("bins_compared"))
    over = (f", over the {compared} of {pos['bins']} bins both have sentences in" if compared
            and compared < pos["bins"] else "")
    lines.append(_estimate_line(f"area between the curves (correct - incorrect{over})", area))
    lines.append(_estimate_line("correlation of teacher share with correctness (point-biserial r)",
                                report["correlation"]))
    return "\n".join(lines)


def _estimate_line(what: str, e: dict) -> str:
    if e["value"] is None:
        return f"{what}: undefined ({e['why']})"
    defined = (f"; {e['resamples']} of {e['resamples_drawn']} resamples have a value"
               if e["resamples"] < e["resamples_drawn"] else "")
    interval = (f", {e['level']:.0%} bootstrap interval over problems [{e['interval'][0]:+.3f}, "
                f"{e['interval'][1]:+.3f}]{defined}" if e["interval"] else "")
    return f"{what}: {e['value']:+.3f}{interval}"


def plot_report(report: dict, path) -> None:
    """Left: teacher share by relative position, correct against incorrect answers, the area between
    them shaded. Right: each response's teacher share by correctness, with r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = report["by_position"]
    x = np.array(pos["position"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    curves = {}
    for name, colour in (("correct", "#2ca02c"), ("incorrect", "#d62728")):
        y = np.array([np.nan if v is None else v for v in pos[name]["teacher"]])
        curves[name] = y
        left.plot(x, y, marker="o", color=colour, label=f"{name} ({sum(pos[name]['sentences'])} sentences)")
    both = np.isfinite(curves["correct"]) & np.isfinite(curves["incorrect"])
    left.fill_between(x, curves["correct"], curves["incorrect"], where=both, color="#999999", alpha=0.3,
                      label="area between")
    area = report["teacher_area"]
    left.set_title("teacher share by position" + (f": area {area['value']:+.3f}" if area["value"] is not None else ""))
    left.set_xlabel("relative position in the response")
    left.set_ylabel("share of teacher sentences")
    left.set_xlim(0, 1)
    left.set_ylim(0, max(0.05, np.nanmax(np.concatenate([curves["correct"], curves["incorrect"], [0.0]])) * 1.15))
    left.legend(fontsize=8)
    rng = np.random.default_rng(0)  # jitter only
    for k, (name, flag, colour) in enumerate((("incorrect", False, "#d62728"), ("correct", True, "#2ca02c"))):
        shares = [r["teacher"] for r in report["per_response"] if r["correct"] is flag]
        right.scatter(k + rng.uniform(-0.15, 0.15, len(shares)), shares, s=12, color=colour, alpha=0.7)
    right.set_xticks([0, 1], ["incorrect", "correct"])
    right.set_ylabel("teacher share of the response")
    r = report["correlation"]
    right.set_title("per response" + (f": r = {r['value']:+.2f}" if r["value"] is not None else ""))
    fig.tight_layout()
    save_plot(fig, path, "provenance-report")
    plt.close(fig)
