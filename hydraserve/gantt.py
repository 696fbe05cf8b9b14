"""A cold start as a PNG Gantt chart: per stage a fetch lane and a worker lane (process start
to engine ready), a lane for the request (queue, prefill), and the markers (first token,
consolidation) as vertical lines.

matplotlib is imported inside `write_gantt`, so only `events timeline --png` pays for it.
"""

from __future__ import annotations

from pathlib import Path

from hydraserve.event_view import ColdStart, Phase

_PHASE_COLORS = {
    "fetch": "#4c72b0",
    "process start": "#8c8c8c",
    "imports": "#dd8452",
    "engine import": "#c44e52",
    "build": "#937860",
    "load": "#55a868",
    "engine ready": "#8172b3",
    "queue": "#cccccc",
    "prefill": "#da8bc3",
}
_MARKER_COLORS = ("#000000", "#e377c2", "#17becf", "#bcbd22", "#d62728", "#9467bd",
                  "#2ca02c", "#ff7f0e")
_BAR_HEIGHT = 0.6


def _lane(phase: Phase) -> str:
    if phase.stage is None:
        return "request"
    return f"stage {phase.stage} {'fetch' if phase.name == 'fetch' else 'worker'}"


def _lanes(start: ColdStart) -> list[str]:
    """Top to bottom: each stage's fetch and worker lanes, then the request's."""
    lanes = [f"stage {w.stage} {part}" for w in start.stages for part in ("fetch", "worker")]
    return [*lanes, "request"]


def write_gantt(start: ColdStart, path: Path) -> None:
    """Draw `start` into the PNG file `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lanes = _lanes(start)
    row_of = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    figure = Figure(figsize=(11, 1.5 + 0.45 * len(lanes)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for phase in start.phases:
        axes.barh(row_of[_lane(phase)], phase.duration_s, left=phase.start_s,
                  height=_BAR_HEIGHT, color=_PHASE_COLORS.get(phase.name, "#999999"),
                  edgecolor="white", linewidth=0.5)
    handles = [Patch(color=color, label=name) for name, color in _PHASE_COLORS.items()
               if any(p.name == name for p in start.phases)]
    marker_names = list(dict.fromkeys(m.name for m in start.markers))
    for marker in start.markers:
        color = _MARKER_COLORS[marker_names.index(marker.name) % len(_MARKER_COLORS)]
        axes.axvline(marker.at_s, color=color, linestyle="--", linewidth=1.0)
    for i, name in enumerate(marker_names):
        handles.append(axes.plot([], [], color=_MARKER_COLORS[i % len(_MARKER_COLORS)],
                                 linestyle="--", label=name)[0])
    axes.set_yticks(list(row_of.values()), labels=list(row_of))
    axes.axvline(0.0, color="#444444", linewidth=0.8)
    axes.set_xlabel("seconds since the request arrived")
    axes.set_title(f"cold start of {start.request_id} on endpoint {start.endpoint_id} "
                   f"(degree {start.degree})")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
