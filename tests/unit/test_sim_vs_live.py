"""The simulator configured like a live run (`hydraserve.sim.live`) and the calibration it
needs: start-up alongside the fetch, the ready tail, dispatch and client overheads."""

from __future__ import annotations

import math

import pytest

from hydraserve.sim.calibration import Calibration, ModelCalibration, calibrate
from hydraserve.sim.cluster import (
    GB,
    GBPS,
    SIZE_CLASSES,
    Cluster,
    Server,
    ServingTimes,
    SizeClass,
    StorageNode,
    size_class_of,
)
from hydraserve.sim.engine import SimConfig, simulate
from hydraserve.sim.live import (
    GIB,
    LiveModel,
    LiveSetup,
    Metric,
    alternate_windows,
    client_overhead_s,
    compare,
    events_between,
    held_out_calibration,
    live_cluster,
    live_sim_config,
    live_size_classes,
    median_metrics,
    paired_requests,
    resampled_within,
    scale_slos,
    solo_fetch_bytes_per_s,
)
from hydraserve.workload.analyze import RunSummary, summarize
from hydraserve.workload.records import RequestResult, RunHeader, WorkloadRequest
from libs.common.messages import Event

pytestmark = pytest.mark.unit

SETUP = LiveSetup(num_nodes=2, gpu_memory_gib=4.0, nic_gbps=0.08, keep_alive_s=10.0,
                  models={"sv-0": LiveModel(size_bytes=20_000_000, num_layers=4)})


def request(request_id: str, arrival_s: float, *, model: str = "sv-0",
            ttft_slo_s: float = 7.5, tpot_slo_s: float = 0.2) -> WorkloadRequest:
    return WorkloadRequest(request_id=request_id, arrival_s=arrival_s, model=model,
                           app="chatbot", prompt_tokens=16, output_tokens=11,
                           ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)


def ready_event(worker_id: str, *, placed: float, started: float, load_started: float,
                ready: float) -> list[Event]:
    return [
        Event(kind="worker.placed", time=placed, worker_id=worker_id, model="m"),
        Event(kind="worker.ready", time=ready, worker_id=worker_id, model="m",
              data={"phases": {"process_started_at": started, "load_started_at": load_started,
                               "ready_at": ready}}),
    ]


def fetch_done(worker_id: str, time: float, fetch_s: float, *, node_id: str = "node-0",
               bytes_per_s: float = 1e7, cached: bool = False) -> Event:
    return Event(kind="fetch.done", time=time, worker_id=worker_id, node_id=node_id,
                 data={"fetch_s": fetch_s, "bytes_per_s": bytes_per_s, "cached": cached})


# --- calibration -----------------------------------------------------------------------------


def test_calibrate_measures_start_up_alongside_the_fetch_and_the_tail_after_both() -> None:
    events = [
        # worker 1: start-up (placement -> load start) 4.3 s outlasts its 2 s fetch
        *ready_event("1", placed=100.0, started=100.3, load_started=104.3, ready=104.4),
        fetch_done("1", 102.0, 2.0),
        # worker 2: the fetch (ends at 206) outlasts the 3.5 s start-up; tail after the fetch
        *ready_event("2", placed=200.0, started=200.2, load_started=203.5, ready=206.3),
        fetch_done("2", 206.0, 6.0),
        # worker 3: fetched before its process started (no overlap): left out
        *ready_event("3", placed=300.0, started=305.0, load_started=306.0, ready=306.5),
        fetch_done("3", 304.0, 4.0),
    ]
    calibration = calibrate(sorted(events, key=lambda e: e.time))
    assert calibration.worker_init_s == pytest.approx((4.3 + 3.5) / 2)
    assert calibration.ready_tail_s == pytest.approx((0.1 + 0.3) / 2)


def test_calibrate_takes_dispatch_from_requests_received_while_a_worker_was_ready() -> None:
    def received(request_id: str, time: float) -> Event:
        return Event(kind="request.received", time=time, model="m", request_id=request_id)

    def done(request_id: str, queue_s: float) -> Event:
        return Event(kind="request.done", time=0.0, model="m", request_id=request_id,
                     data={"queue_s": queue_s, "ttft_s": queue_s + 0.05})

    events = [
        received("cold", 1.0),
        Event(kind="worker.ready", time=5.0, worker_id="1", model="m"),
        received("warm-1", 6.0), received("warm-2", 7.0), received("warm-3", 8.0),
        Event(kind="worker.stop_requested", time=20.0, worker_id="1", model="m"),
        received("cold-again", 21.0),
        done("cold", 4.0), done("warm-1", 0.01), done("warm-2", 0.03), done("warm-3", 0.02),
        done("cold-again", 5.0),
    ]
    assert calibrate(events).dispatch_s == pytest.approx(0.02)


def test_calibrate_fits_a_line_through_prefill_steps_of_several_requests() -> None:
    events = []

    def step(time: float, prompts: list[int], prefill_s: float) -> None:
        for i, tokens in enumerate(prompts):
            request_id = f"r{time}-{i}"
            events.append(Event(kind="request.first_token", time=time + 0.002 * i,
                                worker_id="1", model="m", request_id=request_id))
            events.append(Event(kind="request.done", time=time + 1, worker_id="1", model="m",
                                request_id=request_id, data={
                                    "queue_s": 0.5, "ttft_s": 0.5 + prefill_s - 0.001 * i,
                                    "usage": {"prompt_tokens": tokens}}))

    step(10.0, [100], 0.10)
    step(20.0, [100, 100], 0.17)  # one step of 200 tokens
    step(30.0, [150, 100, 50], 0.24)
    fitted = calibrate(events).models["m"]
    assert fitted.prefill_base_s == pytest.approx(0.03)
    assert fitted.prefill_s_per_token == pytest.approx(0.0007)
    times = Calibration(models={"m": fitted}).times("m", ServingTimes(tpot_s=0.1))
    assert times.prefill_s(400) == pytest.approx(0.31)


def test_calibrate_takes_the_spread_of_warm_requests_over_their_prediction() -> None:
    events: list[Event] = [Event(kind="worker.ready", time=5.0, worker_id="1", model="m")]
    # 21 warm requests, one prefill step each: queue 0.01 s, 100 prompt tokens; their
    # prefills are 0.03, 0.04, ..., 0.23 s, so the median line is 0.13 s flat (all the same
    # size: no slope to fit) and dispatch 0.01 s: predicted TTFT 0.14 s
    for i in range(21):
        request_id = f"w{i}"
        events.append(Event(kind="request.received", time=6.0 + i, model="m",
                            request_id=request_id))
        events.append(Event(kind="request.first_token", time=6.5 + i, worker_id="1",
                            model="m", request_id=request_id))
        events.append(Event(kind="request.done", time=7.0 + i, worker_id="1", model="m",
                            request_id=request_id, data={
                                "queue_s": 0.01, "ttft_s": 0.01 + 0.03 + 0.01 * i,
                                "usage": {"prompt_tokens": 100}}))
    # a cold request (no worker up when it came; its prefill 0.13 s keeps the median) is left
    # out of the spread
    events.append(Event(kind="request.received", time=1.0, model="m", request_id="cold"))
    events.append(Event(kind="request.done", time=5.5, model="m", request_id="cold",
                        data={"queue_s": 4.0, "ttft_s": 4.13,
                              "usage": {"prompt_tokens": 100}}))
    calibration = calibrate(sorted(events, key=lambda e: e.time))
    assert calibration.dispatch_s == pytest.approx(0.01)
    assert calibration.models["m"].prefill_s == pytest.approx(0.13)
    spread = calibration.warm_spread
    assert len(spread) == 21
    # the i-th of 21 equally spaced ratios sits at percentile 5 i
    assert spread == pytest.approx([(0.04 + 0.01 * i) / 0.14 for i in range(21)])


def _host_events(num_busy_starting: int) -> list[Event]:
    """Warm requests of model m (worker 1 ready at 5 s; queue 0.01 s, 100 prompt tokens each):
    five received on an idle host (prefill 0.04 s), `num_busy_starting` while worker 2 of
    another model was starting (placed at 20 s, ready at 40 s; prefill 0.09 s), then "c"
    (idle, 0.04 s, in flight 45-60 s) and "d" received while c was in flight (0.09 s)."""
    events = [Event(kind="worker.placed", time=0.0, worker_id="1", model="m"),
              Event(kind="worker.ready", time=5.0, worker_id="1", model="m"),
              Event(kind="worker.placed", time=20.0, worker_id="2", model="m2"),
              Event(kind="worker.ready", time=40.0, worker_id="2", model="m2")]

    def warm(request_id: str, at: float, prefill_s: float, *, done_at: float) -> None:
        events.append(Event(kind="request.received", time=at, model="m",
                            request_id=request_id))
        events.append(Event(kind="request.done", time=done_at, model="m",
                            request_id=request_id, data={
                                "queue_s": 0.01, "ttft_s": 0.01 + prefill_s,
                                "usage": {"prompt_tokens": 100}}))

    for i in range(5):
        warm(f"idle{i}", 6.0 + 2 * i, 0.04, done_at=6.5 + 2 * i)
    for i in range(num_busy_starting):
        warm(f"busy{i}", 21.0 + 2 * i, 0.09, done_at=21.5 + 2 * i)
    warm("c", 45.0, 0.04, done_at=60.0)
    warm("d", 46.0, 0.09, done_at=47.0)
    return sorted(events, key=lambda e: e.time)


def test_calibrate_takes_the_spread_apart_by_whether_the_host_was_busy() -> None:
    calibration = calibrate(_host_events(num_busy_starting=5))
    # 6 prefills of 0.04 s and 6 of 0.09 s: median 0.065, + dispatch 0.01 = predicted 0.075
    assert calibration.models["m"].prefill_s == pytest.approx(0.065)
    assert calibration.host_spread is not None
    idle, busy = calibration.host_spread
    assert idle == pytest.approx([0.05 / 0.075] * 21)
    assert busy == pytest.approx([0.10 / 0.075] * 21)


def test_calibrate_leaves_the_host_spread_out_with_too_few_busy_requests() -> None:
    calibration = calibrate(_host_events(num_busy_starting=3))  # 4 busy requests
    assert calibration.host_spread is None
    assert len(calibration.warm_spread) == 21


def test_apply_prefers_the_overlapped_start_up_and_sets_the_tail() -> None:
    base = live_cluster(SETUP, Calibration())
    measured = Calibration(startup_s=2.0, worker_init_s=4.3, ready_tail_s=0.1).apply(base)
    assert (measured.startup_s, measured.ready_tail_s) == (4.3, 0.1)
    policy_only = Calibration(startup_s=2.0).apply(base)
    assert (policy_only.startup_s, policy_only.ready_tail_s) == (2.0, 0.0)


def test_times_add_dispatch_to_the_measured_prefill_and_keep_the_client_overhead() -> None:
    calibration = Calibration(models={"m": ModelCalibration(prefill_s=0.2, tpot_s=0.02)},
                              dispatch_s=0.01, client_overhead_s=0.03)
    default = ServingTimes(tpot_s=0.5, prefill_base_s=1.0, prefill_s_per_token=0.1)
    # the client's overhead is fixed: no spread or pipeline factor scales it
    assert calibration.times("m", default) == ServingTimes(
        tpot_s=0.02, prefill_base_s=pytest.approx(0.21), prefill_s_per_token=0.0,
        overhead_s=0.03)
    assert calibration.times("other", default).prefill_base_s == pytest.approx(1.01)


# --- the simulator ---------------------------------------------------------------------------


def test_the_ready_tail_comes_after_the_fetch_and_the_start_up() -> None:
    cls = SizeClass("2b", size_bytes=int(2 * GB), num_layers=4, kv_cache_bytes=0,
                    times={"T4": ServingTimes(tpot_s=0.1, prefill_base_s=0.5)})
    cluster = Cluster(servers=(Server("s0", "T4", 1, int(10 * GB), 1 * GB),),
                      storage=(StorageNode("st", 1000 * GB),), startup_s=3.0,
                      ready_tail_s=0.25)
    (done,) = simulate([request("r1", 0.0, model="m-2b")], policy="single_worker",
                       cluster=cluster, size_classes={"2b": cls}).results
    assert done.ttft_s == pytest.approx(3.0 + 0.25 + 0.5)  # max(fetch 2, start-up 3) + ...


@pytest.mark.parametrize(("batch_prefill", "ttft_s"), [(True, 3.0 + 0.03 + 0.001 * 300),
                                                      (False, 3.0 + 0.03 + 0.001 * 200)])
def test_requests_taken_together_share_one_prefill_step_when_batched(
        batch_prefill: bool, ttft_s: float) -> None:
    calibration = Calibration(models={"sv-0": ModelCalibration(
        prefill_base_s=0.03, prefill_s_per_token=0.001, tpot_s=0.02)}, worker_init_s=3.0)
    requests = [request("r1", 0.0).model_copy(update={"prompt_tokens": 100}),
                request("r2", 0.0).model_copy(update={"prompt_tokens": 200})]
    config = SimConfig(keep_alive_s=10.0, max_pipeline_degree=1, batch_prefill=batch_prefill)
    first, second = simulate(requests, policy="hydraserve",
                             cluster=live_cluster(SETUP, calibration), config=config,
                             size_classes=live_size_classes(SETUP, calibration)).results
    assert second.ttft_s == pytest.approx(ttft_s)
    assert first.ttft_s == pytest.approx(ttft_s if batch_prefill else 3.0 + 0.03 + 0.1)


def test_each_prefill_step_takes_a_factor_drawn_from_the_spread() -> None:
    calibration = Calibration(models={"sv-0": ModelCalibration(
        prefill_base_s=0.05, prefill_s_per_token=0.0, tpot_s=0.02)}, worker_init_s=3.0)
    # warm requests, far enough apart to be lone steps on the one endpoint
    requests = [request(f"r{i}", 5.0 + i) for i in range(200)]

    def warm_ttfts(spread: tuple[float, ...], seed: int = 0) -> list[float]:
        config = SimConfig(keep_alive_s=1000.0, max_pipeline_degree=1, batch_prefill=True,
                           service_spread=spread, seed=seed)
        results = simulate([request("first", 0.0), *requests], policy="hydraserve",
                           cluster=live_cluster(SETUP, calibration), config=config,
                           size_classes=live_size_classes(SETUP, calibration)).results
        return [r.ttft_s for r in results if r.request_id != "first"]  # type: ignore[misc]

    assert warm_ttfts(()) == pytest.approx([0.05] * 200)
    assert warm_ttfts((2.0, 2.0, 2.0)) == pytest.approx([0.1] * 200)
    drawn = warm_ttfts((1.0, 2.0, 5.0))
    assert all(0.05 <= t <= 0.25 for t in drawn)
    # half the draws fall below the middle percentile (factor 2): about 100 of 200
    assert 80 <= sum(t < 0.1 for t in drawn) <= 120
    assert drawn == warm_ttfts((1.0, 2.0, 5.0))  # seeded
    assert drawn != warm_ttfts((1.0, 2.0, 5.0), seed=1)


def test_a_step_draws_from_the_spread_of_the_host_state_when_it_starts() -> None:
    setup = LiveSetup(num_nodes=2, gpu_memory_gib=4.0, nic_gbps=0.08, keep_alive_s=1000.0,
                      models={m: LiveModel(size_bytes=20_000_000, num_layers=4)
                              for m in ("sv-0", "sv-1")})
    calibration = Calibration(models={m: ModelCalibration(
        prefill_base_s=0.05, prefill_s_per_token=0.0, tpot_s=0.02) for m in ("sv-0", "sv-1")},
        worker_init_s=3.0, client_overhead_s=0.01)
    requests = [
        request("cold", 0.0),  # its step starts when its worker is ready: nothing else runs
        request("idle", 5.0),
        request("decoding", 10.0),  # in flight until 10.06 + 10 tokens x 0.02 = 10.26
        request("beside-decoding", 10.1),
        request("other-model-cold", 20.0, model="sv-1"),  # its worker starts 20-23
        request("beside-starting", 21.0),
        request("idle-again", 30.0),
    ]
    config = SimConfig(keep_alive_s=1000.0, max_pipeline_degree=1, batch_prefill=True,
                       host_spread=((1.0, 1.0), (3.0, 3.0)))
    results = simulate(requests, policy="hydraserve", cluster=live_cluster(setup, calibration),
                       config=config, size_classes=live_size_classes(setup, calibration)).results
    ttfts = {r.request_id: r.ttft_s for r in results}
    # idle: prefill 0.05 x 1 + the client's 0.01; busy: 0.05 x 3 + 0.01
    assert ttfts == pytest.approx({
        "cold": 3.0 + 0.06, "idle": 0.06, "decoding": 0.06, "beside-decoding": 0.16,
        "other-model-cold": 3.0 + 0.06, "beside-starting": 0.16, "idle-again": 0.06})


@pytest.mark.parametrize("spread", [(1.0,), (2.0, 1.0), (-1.0, 1.0)])
def test_a_spread_must_be_ascending_non_negative_percentiles(spread: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bad simulator config"):
        SimConfig(service_spread=spread)
    with pytest.raises(ValueError, match="bad simulator config"):
        SimConfig(host_spread=((1.0, 1.0), spread))


@pytest.mark.parametrize(("service", "host"), [
    ((), ((), (1.0, 2.0))),  # a host state with no percentiles
    ((1.0, 2.0), ((1.0, 2.0), (1.0, 2.0))),  # both kinds of spread at once
])
def test_a_host_spread_needs_both_sets_and_no_service_spread(
        service: tuple[float, ...], host: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    with pytest.raises(ValueError, match="bad simulator config"):
        SimConfig(service_spread=service, host_spread=host)


def test_a_class_named_like_the_model_wins_over_the_size_in_its_name() -> None:
    own = SizeClass("chat-13b", size_bytes=1, num_layers=2, kv_cache_bytes=0)
    assert size_class_of("chat-13b", {**SIZE_CLASSES, "chat-13b": own}) is own
    assert size_class_of("chat-13b-1", {**SIZE_CLASSES, "chat-13b": own}).name == "13b"


# --- configured like the live run ------------------------------------------------------------


def test_live_cluster_is_one_single_gpu_server_per_node_with_unlimited_storage() -> None:
    cluster = live_cluster(SETUP, Calibration(worker_init_s=4.0))
    assert [s.node_ids() for s in cluster.servers] == [["0.node-0"], ["0.node-1"]]
    assert {s.gpu_memory_bytes for s in cluster.servers} == {4 * GIB}
    assert [s.nic_bytes_per_s for s in cluster.servers] == [pytest.approx(0.08 * GBPS)] * 2
    assert cluster.storage[0].egress_bytes_per_s == math.inf
    assert cluster.startup_s == 4.0
    measured = live_cluster(SETUP, Calibration(), nic_bytes_per_s=8.5e6)
    assert {s.nic_bytes_per_s for s in measured.servers} == {8.5e6}


def test_a_live_model_is_simulated_with_its_own_size_and_measured_times() -> None:
    calibration = Calibration(models={"sv-0": ModelCalibration(prefill_s=0.2, tpot_s=0.02)},
                              worker_init_s=3.0, ready_tail_s=0.1)
    classes = live_size_classes(SETUP, calibration)
    assert classes["sv-0"].size_bytes == 20_000_000
    result = simulate([request("r1", 0.0), request("r2", 10.0)], policy="hydraserve",
                      cluster=live_cluster(SETUP, calibration),
                      config=live_sim_config(SETUP), size_classes=classes)
    cold, warm = result.results
    # the 20 MB fetch at 10 MB/s (2 s) hides under the 3 s start-up
    assert cold.ttft_s == pytest.approx(3.0 + 0.1 + 0.2)
    assert warm.ttft_s == pytest.approx(0.2)
    assert cold.tpot_s == pytest.approx(0.02)
    assert [w.degree for w in result.workers] == [1]


def test_live_sim_config_takes_keep_alive_capacity_and_degree() -> None:
    assert live_sim_config(SETUP) == SimConfig(keep_alive_s=10.0, max_batch=8,
                                               max_pipeline_degree=1, batch_prefill=True)


def test_scale_slos_scales_ttft_and_keeps_the_rest() -> None:
    (scaled,) = scale_slos([request("r1", 1.5)], ttft_scale=0.4)
    assert (scaled.ttft_slo_s, scaled.tpot_slo_s, scaled.arrival_s) == (3.0, 0.2, 1.5)
    with pytest.raises(ValueError):
        scale_slos([request("r1", 1.5)], ttft_scale=0.0)


def test_events_between_keeps_the_half_open_window() -> None:
    events = [Event(kind="node.heartbeat", time=t) for t in (1.0, 2.0, 3.0)]
    assert [e.time for e in events_between(events, 2.0, 3.0)] == [2.0]


def test_solo_fetch_rate_leaves_out_fetches_sharing_their_node() -> None:
    def started(worker_id: str, time: float, node_id: str) -> Event:
        return Event(kind="fetch.started", time=time, worker_id=worker_id, node_id=node_id)

    events = [
        started("1", 0.0, "node-0"), started("2", 1.0, "node-0"), started("3", 1.0, "node-1"),
        fetch_done("1", 4.0, 4.0, bytes_per_s=5e6),
        fetch_done("2", 5.0, 4.0, bytes_per_s=5e6),
        fetch_done("3", 3.0, 2.0, node_id="node-1", bytes_per_s=9e6),
        started("4", 10.0, "node-0"), fetch_done("4", 12.0, 2.0, bytes_per_s=8e6),
        started("5", 20.0, "node-0"), fetch_done("5", 20.1, 0.1, bytes_per_s=1e9, cached=True),
    ]
    assert solo_fetch_bytes_per_s(events) == pytest.approx(8.5e6)


def test_client_overhead_pairs_the_kth_sent_with_the_kth_received_per_model() -> None:
    def result(request_id: str, submit_s: float, ttft_s: float, model: str) -> RequestResult:
        return RequestResult(request_id=request_id, model=model, app="chatbot",
                             submit_s=submit_s, ttft_s=ttft_s, ttft_slo_s=1, tpot_slo_s=1)

    def gateway(request_id: str, time: float, ttft_s: float, model: str) -> list[Event]:
        return [Event(kind="request.received", time=time, model=model, request_id=request_id),
                Event(kind="request.done", time=time + ttft_s, model=model,
                      request_id=request_id, data={"ttft_s": ttft_s})]

    results = [result("a1", 0.0, 0.10, "a"), result("b1", 0.5, 5.05, "b"),
               result("a2", 1.0, 0.12, "a"), result("a3", 9.0, 0.50, "a")]
    events = [*gateway("g-a1", 100.01, 0.07, "a"), *gateway("g-b1", 100.51, 5.0, "b"),
              *gateway("g-a2", 101.01, 0.08, "a"),
              # 5 s after a3 was sent: not its pair
              *gateway("g-a3", 114.0, 0.05, "a")]
    assert client_overhead_s(results, started_at=100.0, events=events) == pytest.approx(0.04)


def test_compare_reports_relative_errors_and_which_metrics_are_targets() -> None:
    def summary(ttfts: list[float]) -> RunSummary:
        results = [RequestResult(request_id=f"r{i}", model="m", app="chatbot", submit_s=i,
                                 ttft_s=t, tpot_s=0.01, output_tokens=2, ttft_slo_s=1.0,
                                 tpot_slo_s=1.0) for i, t in enumerate(ttfts)]
        return summarize(RunHeader(name="x", policy="p"), results, [])

    metrics = {m.name: m for m in compare(summary([0.5, 2.0]), summary([0.5, 0.5]))}
    assert metrics["attainment (both SLOs)"].relative_error == pytest.approx(1.0)
    assert metrics["TTFT p50 (s)"].relative_error == pytest.approx((0.5 - 1.25) / 1.25)
    assert not metrics["TTFT p50 (s)"].is_within(0.15)
    assert not metrics["TPOT p50 (s)"].is_target
    assert Metric("x", 1.0, 1.1).is_within(0.15)
    assert Metric("x", 0.0, 0.1).relative_error is None


def test_median_metrics_takes_each_metrics_median_over_the_simulated_runs() -> None:
    runs = [[Metric("p50", 1.0, sim), Metric("cost", 2.0, None, is_target=False)]
            for sim in (0.9, 1.3, 1.0)]
    merged = median_metrics(runs)
    assert merged == [Metric("p50", 1.0, 1.0), Metric("cost", 2.0, None, is_target=False)]


def test_resampling_a_run_shows_how_firmly_it_pins_its_own_percentile() -> None:
    assert resampled_within([0.05] * 80, 50, tolerance=0.15) == 1.0
    # 0.05, 0.051, ..., 0.129: a resampled median rarely strays 15 % (0.013 s) from 0.0895
    assert resampled_within([0.05 + 0.001 * i for i in range(80)], 50,
                            tolerance=0.15) > 0.95
    # the median on a cliff between warm (0.05 s) and cold (5 s) requests: a resample's
    # median is one side or the other, rarely within 15 % of the middle
    cliff = [0.05] * 40 + [5.0] * 40
    assert resampled_within(cliff, 50, tolerance=0.15) < 0.2
    assert resampled_within(cliff, 50, tolerance=0.15) == resampled_within(
        cliff, 50, tolerance=0.15)  # seeded
    assert resampled_within([], 50, tolerance=0.15) is None


# --- one run, split in alternate windows -------------------------------------------------------


def test_alternate_windows_split_requests_by_the_parity_of_their_window() -> None:
    requests = [request(f"r{t}", t) for t in (0.0, 59.9, 60.0, 119.9, 120.0, 200.0)]
    even, odd = alternate_windows(requests, 60.0)
    assert even == {"r0.0", "r59.9", "r120.0"}
    assert odd == {"r60.0", "r119.9", "r200.0"}
    with pytest.raises(ValueError, match="window"):
        alternate_windows(requests, 0.0)


def test_paired_requests_match_the_kth_sent_with_the_kth_received_per_model() -> None:
    results = [RequestResult(request_id=f"c{i}", model=m, app="chatbot", submit_s=t,
                             output_tokens=1, status="ok", ttft_s=0.1, ttft_slo_s=7.5,
                             tpot_slo_s=0.2)
               for i, (m, t) in enumerate([("a", 1.0), ("b", 1.5), ("a", 3.0), ("a", 9.0)])]
    events = [Event(kind="request.received", time=100.0 + t, model=m, request_id=g)
              for m, t, g in [("a", 1.01, "g1"), ("b", 1.52, "g2"), ("a", 3.02, "g3"),
                              ("a", 11.0, "g4")]]  # g4: 2 s after c3 was sent
    pairs = paired_requests(results, started_at=100.0, events=events)
    assert [(r.request_id, e.request_id) for r, e in pairs] == [
        ("c0", "g1"), ("c2", "g3"), ("c1", "g2")]


def test_a_held_out_calibration_measures_only_its_own_requests_and_workers() -> None:
    def received(request_id: str, time: float) -> Event:
        return Event(kind="request.received", time=time, model="m", request_id=request_id)

    def done(request_id: str, time: float, prefill_s: float) -> Event:
        return Event(kind="request.done", time=time, model="m", request_id=request_id,
                     data={"queue_s": 0.01, "ttft_s": 0.01 + prefill_s, "e2e_s": 1.0,
                           "usage": {"prompt_tokens": 100, "completion_tokens": 11}})

    events = [
        # worker 1 (calibration) starts up in 4.3 s; worker 2 (held out) in 9 s
        *ready_event("1", placed=0.0, started=0.3, load_started=4.3, ready=4.4),
        fetch_done("1", 2.0, 2.0),
        *ready_event("2", placed=60.0, started=60.3, load_started=69.0, ready=69.1),
        fetch_done("2", 62.0, 2.0),
        # calibration requests: prefill 0.04 s; the four held out: 0.5 s
        received("c1", 10.0), done("c1", 11.0, 0.04),
        received("c2", 20.0), done("c2", 21.0, 0.04),
        received("c3", 30.0), done("c3", 31.0, 0.04),
        *(e for i in range(4) for e in (received(f"h{i}", 70.0 + 2 * i),
                                        done(f"h{i}", 71.0 + 2 * i, 0.5))),
    ]
    events.sort(key=lambda e: e.time)
    calibration = held_out_calibration(events, {"c1", "c2", "c3"}, {"1"})
    assert calibration.worker_init_s == pytest.approx(4.3)
    assert calibration.models["m"].prefill_s == pytest.approx(0.04)
    assert calibration.models["m"].tpot_s == pytest.approx((1.0 - 0.05) / 10)
    assert calibration.dispatch_s == pytest.approx(0.01)
    # from everything, the held-out requests and worker would count
    everything = calibrate(events)
    assert everything.worker_init_s == pytest.approx((4.3 + 9.0) / 2)
    assert everything.models["m"].prefill_s == pytest.approx(0.5)
