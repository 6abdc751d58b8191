"""What `rsd provenance` reports: category shares per response and overall, and a stacked-bar plot."""

from __future__ import annotations

from .categories import CATEGORIES

SHOWN_RESPONSES = 20  # rows of the printed per-response table
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
