"""The numbers of a run: SLO attainment, latency percentiles and GPU cost per request.

`summarize(header, results, workers)` turns a results file's records (a live run or a
simulated one, see `records`) into a `RunSummary`; `format_summary` and `format_comparison`
render one run, or several side by side with ratios to the first, as text lines.

Definitions (docs/WORKLOADS.md):
- a request meets its TTFT SLO when its status is "ok" and ttft_s <= ttft_slo_s; its TPOT SLO
  when its status is "ok" and tpot_s <= tpot_slo_s (a one-token answer, tpot_s None, meets
  it: no token came late); attainment is the fraction of all requests, errors included.
- percentiles (linear interpolation, numpy's default) are over the requests with a value.
- cost: the sum over workers of GPU memory (GB = 1e9 bytes) x held seconds, divided by the
  number of requests (GB·s per request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from hydraserve.workload.records import RequestResult, RunHeader, WorkerLifetime

GB = 1e9
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Attainment:
    num_requests: int
    num_ok: int
    # fractions of num_requests
    ttft: float
    tpot: float
    both: float


@dataclass(frozen=True)
class RunSummary:
    name: str
    policy: str
    overall: Attainment
    by_app: dict[str, Attainment]
    by_model: dict[str, Attainment]
    # percentile -> seconds; None when no request has the value
    ttft_s: dict[int, float | None]
    tpot_s: dict[int, float | None]
    num_workers: int
    gpu_gb_s: float
    # gpu_gb_s / requests; None without requests
    cost_gb_s_per_request: float | None
    # the ok requests' TTFTs, sorted (for CDFs)
    ttfts: list[float] = field(default_factory=list)


def meets_ttft(result: RequestResult) -> bool:
    return result.status == "ok" and result.ttft_s is not None \
        and result.ttft_s <= result.ttft_slo_s


def meets_tpot(result: RequestResult) -> bool:
    return result.status == "ok" and (result.tpot_s is None
                                      or result.tpot_s <= result.tpot_slo_s)


def attainment(results: list[RequestResult]) -> Attainment:
    num = len(results)

    def fraction(ok: Callable[[RequestResult], bool]) -> float:
        return sum(1 for r in results if ok(r)) / num if num else 0.0

    return Attainment(num_requests=num, num_ok=sum(1 for r in results if r.status == "ok"),
                      ttft=fraction(meets_ttft), tpot=fraction(meets_tpot),
                      both=fraction(lambda r: meets_ttft(r) and meets_tpot(r)))


def percentiles(values: Iterable[float | None]) -> dict[int, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return dict.fromkeys(PERCENTILES)
    return {p: float(np.percentile(present, p)) for p in PERCENTILES}


def _grouped(results: list[RequestResult], key: Callable[[RequestResult], str]
             ) -> dict[str, Attainment]:
    groups: dict[str, list[RequestResult]] = {}
    for result in results:
        groups.setdefault(key(result), []).append(result)
    return {name: attainment(groups[name]) for name in sorted(groups)}


def summarize(header: RunHeader, results: list[RequestResult],
              workers: list[WorkerLifetime]) -> RunSummary:
    gb_s = sum(w.gpu_memory_bytes / GB * max(0.0, w.end_s - w.start_s) for w in workers)
    ok = [r for r in results if r.status == "ok"]
    return RunSummary(
        name=header.name, policy=header.policy, overall=attainment(results),
        by_app=_grouped(results, lambda r: r.app),
        by_model=_grouped(results, lambda r: r.model),
        ttft_s=percentiles(r.ttft_s for r in ok), tpot_s=percentiles(r.tpot_s for r in ok),
        num_workers=len(workers), gpu_gb_s=gb_s,
        cost_gb_s_per_request=gb_s / len(results) if results else None,
        ttfts=sorted(r.ttft_s for r in ok if r.ttft_s is not None))


# --- text -----------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def _attainment_rows(label: str, groups: dict[str, Attainment]) -> list[list[str]]:
    return [[f"{label} {name}", str(a.num_requests), str(a.num_ok), _pct(a.ttft), _pct(a.tpot),
             _pct(a.both)] for name, a in groups.items()]


def format_summary(summary: RunSummary) -> list[str]:
    """One run: attainment overall, per app and per model; percentiles; cost."""
    lines = [f"run {summary.name} (policy {summary.policy})"]
    lines += _table([["", "requests", "ok", "TTFT SLO", "TPOT SLO", "both"],
                     *_attainment_rows("all", {"": summary.overall}),
                     *_attainment_rows("app", summary.by_app),
                     *_attainment_rows("model", summary.by_model)])
    lines += _table([["latency (s)", *(f"p{p}" for p in PERCENTILES)],
                     ["TTFT", *(_num(summary.ttft_s[p]) for p in PERCENTILES)],
                     ["TPOT", *(_num(summary.tpot_s[p]) for p in PERCENTILES)]])
    lines.append(f"cost: {summary.num_workers} workers, {summary.gpu_gb_s:.1f} GB·s, "
                 f"{_num(summary.cost_gb_s_per_request)} GB·s per request")
    return lines


def comparison_rows(summaries: list[RunSummary]) -> list[tuple[str, list[float | None]]]:
    """(metric, one value per run): the rows `format_comparison` prints."""
    rows: list[tuple[str, list[float | None]]] = [
        ("requests", [s.overall.num_requests for s in summaries]),
        ("TTFT SLO attainment", [s.overall.ttft for s in summaries]),
        ("TPOT SLO attainment", [s.overall.tpot for s in summaries]),
        ("both SLOs attainment", [s.overall.both for s in summaries]),
    ]
    apps = sorted({app for s in summaries for app in s.by_app})
    rows += [(f"both SLOs {app}",
              [s.by_app[app].both if app in s.by_app else None for s in summaries])
             for app in apps]
    for p in PERCENTILES:
        rows.append((f"TTFT p{p} (s)", [s.ttft_s[p] for s in summaries]))
    for p in PERCENTILES:
        rows.append((f"TPOT p{p} (s)", [s.tpot_s[p] for s in summaries]))
    rows.append(("GPU GB·s per request", [s.cost_gb_s_per_request for s in summaries]))
    return rows


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def format_comparison(summaries: list[RunSummary]) -> list[str]:
    """A table with one column per run and, for every run after the first, its ratio to the
    first ("x/first")."""
    if not summaries:
        return []
    first = summaries[0].name
    header = ["metric", *(s.name for s in summaries),
              *(f"{s.name}/{first}" for s in summaries[1:])]
    rows = [header]
    for metric, values in comparison_rows(summaries):
        cells = [_num(v) if not metric.startswith("requests") else str(v) for v in values]
        cells += [_num(ratio(v, values[0])) for v in values[1:]]
        rows.append([metric, *cells])
    return _table(rows)
