"""The ModelSpecs a simulated run registers: size class from the name, SLOs from the workload."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from hydraserve.sim.cluster import SIZE_CLASSES, SizeClass, size_class_of
from hydraserve.workload.records import WorkloadRequest
from services.scheduler.state import ModelSpec


def even_layout(*, num_layers: int, size_bytes: int,
                degree: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Layer cuts and stage bytes of an even split: stage s gets layers [s*n/p, (s+1)*n/p)
    and bytes in proportion to its layers (the embedding and head are not modelled)."""
    cuts = tuple(num_layers * s // degree for s in range(degree + 1))
    sizes = [size_bytes * (b - a) // num_layers for a, b in itertools.pairwise(cuts)]
    sizes[-1] += size_bytes - sum(sizes)
    return cuts, tuple(sizes)


def model_spec(name: str, size: SizeClass, *, ttft_slo_s: float, tpot_slo_s: float,
               keep_alive_s: float, max_pipeline_degree: int = 4) -> ModelSpec:
    boundaries: dict[int, tuple[int, ...]] = {}
    stage_bytes: dict[int, tuple[int, ...]] = {}
    for degree in range(1, min(max_pipeline_degree, size.num_layers) + 1):
        boundaries[degree], stage_bytes[degree] = even_layout(
            num_layers=size.num_layers, size_bytes=size.size_bytes, degree=degree)
    return ModelSpec(name=name, size_bytes=size.size_bytes, num_layers=size.num_layers,
                     kv_cache_bytes=size.kv_cache_bytes, ttft_slo_s=ttft_slo_s,
                     tpot_slo_s=tpot_slo_s, max_pipeline_degree=max_pipeline_degree,
                     keep_alive_s=keep_alive_s, stage_boundaries=boundaries,
                     stage_bytes=stage_bytes)


def workload_models(requests: Sequence[WorkloadRequest], *, keep_alive_s: float,
                    size_classes: Mapping[str, SizeClass] = SIZE_CLASSES,
                    max_pipeline_degree: int = 4) -> dict[str, ModelSpec]:
    """One ModelSpec per model of the workload, with the SLOs of its first request."""
    specs: dict[str, ModelSpec] = {}
    for request in requests:
        if request.model not in specs:
            specs[request.model] = model_spec(
                request.model, size_class_of(request.model, size_classes),
                ttft_slo_s=request.ttft_slo_s, tpot_slo_s=request.tpot_slo_s,
                keep_alive_s=keep_alive_s, max_pipeline_degree=max_pipeline_degree)
    return specs
