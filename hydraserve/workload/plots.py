"""PNG charts of run summaries: the TTFT CDF of each run, and SLO attainment per application
per run. matplotlib (Agg) is imported only when a chart is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hydraserve.workload.analyze import RunSummary


def _figure() -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(7, 4.5), layout="constrained")


def write_ttft_cdf(summaries: list[RunSummary], path: Path) -> None:
    """One step curve per run: the fraction of ok requests with TTFT <= x."""
    fig = _figure()
    ax = fig.add_subplot()
    for summary in summaries:
        num = len(summary.ttfts)
        if num:
            ax.step(summary.ttfts, [(i + 1) / num for i in range(num)], where="post",
                    label=summary.name)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of ok requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if any(s.ttfts for s in summaries):
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def write_attainment_bars(summaries: list[RunSummary], path: Path) -> None:
    """Grouped bars: both-SLO attainment per application (and overall), one bar per run."""
    apps = sorted({app for s in summaries for app in s.by_app})
    groups = [*apps, "all"]
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(summaries))
    for k, summary in enumerate(summaries):
        values = [summary.by_app[app].both if app in summary.by_app else 0.0 for app in apps]
        values.append(summary.overall.both)
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=summary.name)
    ax.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("requests meeting both SLOs")
    ax.set_ylim(0, 1.05)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def write_plots(summaries: list[RunSummary], png_dir: Path) -> list[Path]:
    paths = [png_dir / "ttft_cdf.png", png_dir / "attainment.png"]
    write_ttft_cdf(summaries, paths[0])
    write_attainment_bars(summaries, paths[1])
    return paths
