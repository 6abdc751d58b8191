"""What `rsd score` reports: per-trace and per-file surprisal figures, the side-by-side table, the histogram."""

from __future__ import annotations

import math
from pathlib import Path

from .reports import save_plot
from .traces import SUB_1PCT_LOGPROB


def surprisal_stats(logprobs: list[float]) -> dict:
    """Share of tokens under 1% probability, mean surprisal (nats), perplexity (finite log-probs: score.py sets
    the others aside). None where undefined: every figure of no tokens, a perplexity past the largest float."""
    n = len(logprobs)
    if n == 0:
        return {"tokens": 0, "sub_1pct_share": None, "mean_surprisal": None, "perplexity": None}
    mean = -sum(logprobs) / n
    return {"tokens": n, "sub_1pct_share": sum(lp < SUB_1PCT_LOGPROB for lp in logprobs) / n,
            "mean_surprisal": mean, "perplexity": math.exp(mean) if mean < MAX_LOG_FLOAT else None}


MAX_LOG_FLOAT = math.log(1.7976931348623157e308)  # exp of more overflows a float


def file_report(f) -> dict:
    """Figures of a scored TraceFile: overall, pooling every token (as the paper's shares do), and per trace;
    the rows left out (skipped, and the traces failed) each with why."""
    return {
        "path": f.path,
        "rows": f.rows,
        "traces": len(f.traces),
        "skipped_rows": len(f.skipped),
        **{m: surprisal_stats([lp for s in f.scores for lp in s[m]]) for m in f.models},
        "per_trace": [{"id": t.id, **{m: surprisal_stats(s[m]) for m in f.models}} for t, s in zip(f.traces, f.scores)],
        "skipped": [{"row": row, "why": why} for row, why in f.skipped],
        "failed_traces": [{"row": t.row, "id": t.id, "why": why} for t, why in f.failed],
    }


def labels(paths: list[str]) -> list[str]:
    """Short names for files: the file name, with as many parent folders as it takes to tell them apart."""
    parts = [Path(p).parts for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = [str(Path(*p[-depth:])) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def format_table(reports: list[dict]) -> str:
    models = [m for m in ("student", "teacher") if reports and m in reports[0]]
    names = labels([r["path"] for r in reports])
    name_width = max(12, *map(len, names))
    head = f"{'file':<{name_width}} {'traces':>6} {'tokens':>8}"
    sub = " " * len(head)
    for m in models:
        head += f" | {m + ': <1% tokens':>18} {'surprisal':>9} {'ppl':>8}"
        sub += f" | {'':>18} {'(nats)':>9} {'':>8}"
    lines = [head, sub.rstrip(), "-" * len(head)]
    for name, r in zip(names, reports):
        first = r[models[0]]
        line = f"{name:<{name_width}} {r['traces']:>6} {first['tokens']:>8}"
        for m in models:
            s = r[m]
            line += (f" | {_figure(s['sub_1pct_share'], '.2%', 18)} {_figure(s['mean_surprisal'], '.3f', 9)} "
                     f"{_figure(s['perplexity'], '.2f', 8)}")
        lines.append(line)
    return "\n".join(lines)


def _figure(value, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"  # None: undefined (no tokens)


def plot_histogram(files, path) -> None:
    """Histogram of per-token student surprisal, one series per file, density on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = labels([f.path for f in files])
    series = [(name, [-lp for s in f.scores for lp in s["student"]]) for name, f in zip(names, files)]
    top = max((max(v) for _, v in series if v), default=1.0)
    bins = [top * i / 60 for i in range(61)] if top > 0 else 60
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series:
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{name} ({len(values)} tokens)")
    ax.axvline(-SUB_1PCT_LOGPROB, color="grey", linestyle="--", linewidth=1, label="student probability 1%")
    ax.set_yscale("log")
    ax.set_xlabel("student surprisal of the trace token (nats)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    save_plot(fig, path, "score")
    plt.close(fig)
