"""The cluster simulator on tiny scenarios whose timings are computed by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hydraserve.sim.calibration import calibrate
from hydraserve.sim.cluster import GB, Cluster, Server, ServingTimes, SizeClass, StorageNode
from hydraserve.sim.engine import SimConfig, SimResult, Simulator, sim_policy, simulate
from hydraserve.sim.network import Network
from hydraserve.sim.scenario import popularity_weights, published_workload
from hydraserve.sim.summary import summarize_run
from hydraserve.workload.records import WorkloadRequest
from libs.common.messages import Event

pytestmark = pytest.mark.unit

# 2 GB, 4 layers; prefill 0.5 s, 0.1 s a token, on any GPU
TINY = SizeClass("2b", size_bytes=int(2 * GB), num_layers=4, kv_cache_bytes=0,
                 times={"T4": ServingTimes(tpot_s=0.1, prefill_base_s=0.5)})
CLASSES = {"2b": TINY}


def cluster(*, num_servers: int = 1, nic: float = 1 * GB, gpu_gb: float = 10) -> Cluster:
    return Cluster(servers=tuple(Server(f"s{i}", "T4", 1, int(gpu_gb * GB), nic)
                                 for i in range(num_servers)),
                   storage=(StorageNode("st", 1000 * GB),), startup_s=1.0, per_hop_s=0.0)


def request(request_id: str, arrival_s: float, *, model: str = "m-2b", output_tokens: int = 11,
            ttft_slo_s: float = 100.0, tpot_slo_s: float = 1.0) -> WorkloadRequest:
    return WorkloadRequest(request_id=request_id, arrival_s=arrival_s, model=model,
                           app="chatbot", prompt_tokens=16, output_tokens=output_tokens,
                           ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)


def run(requests: list[WorkloadRequest], policy: str, *, cluster_: Cluster | None = None,
        **config: float) -> SimResult:
    return simulate(requests, policy=policy, cluster=cluster_ or cluster(),
                    config=SimConfig(**config), size_classes=CLASSES)


def test_serverless_vllm_fetches_then_starts_so_the_first_token_comes_at_3_5_s() -> None:
    result = run([request("r1", 0.0)], "serverless_vllm")
    (done,) = result.results
    assert done.status == "ok"
    assert done.ttft_s == pytest.approx(3.5)  # fetch 2 s + start-up 1 s + prefill 0.5 s
    assert done.tpot_s == pytest.approx(0.1)
    assert result.header.name == "sim:serverless_vllm"


def test_single_worker_overlaps_start_up_with_the_fetch() -> None:
    (done,) = run([request("r1", 0.0)], "single_worker").results
    assert done.ttft_s == pytest.approx(2.5)  # max(fetch 2 s, start-up 1 s) + prefill


def test_two_concurrent_fetches_on_one_nic_share_it() -> None:
    network = Network()
    network.add_link("nic", 1 * GB)
    network.start(1, 2 * GB, ["nic"], now=0.0)
    network.start(2, 1 * GB, ["nic"], now=0.0)
    assert network.next_done_at() == pytest.approx(2.0)  # 1 GB at 0.5 GB/s
    assert network.pop_done(2.0) == [2]
    assert network.next_done_at() == pytest.approx(3.0)  # the last 1 GB at 1 GB/s
    assert network.pop_done(3.0) == [1]


def test_two_models_cold_starting_on_one_server_halve_each_others_fetch() -> None:
    one_server_two_gpus = Cluster(servers=(Server("s0", "T4", 2, int(10 * GB), 1 * GB),),
                                  storage=(StorageNode("st", 1000 * GB),), startup_s=1.0)
    result = run([request("a", 0.0, model="a-2b"), request("b", 0.0, model="b-2b")],
                 "single_worker", cluster_=one_server_two_gpus)
    assert [r.ttft_s for r in result.results] == pytest.approx([4.5, 4.5])  # fetch 4 s each


def test_storage_egress_caps_fetches_from_different_servers() -> None:
    slow_storage = Cluster(servers=(Server("s0", "T4", 1, int(10 * GB), 1 * GB),
                                    Server("s1", "T4", 1, int(10 * GB), 1 * GB)),
                           storage=(StorageNode("st", 1 * GB),), startup_s=1.0)
    result = run([request("a", 0.0, model="a-2b"), request("b", 0.0, model="b-2b")],
                 "single_worker", cluster_=slow_storage)
    assert [r.ttft_s for r in result.results] == pytest.approx([4.5, 4.5])


def test_an_idle_worker_stops_after_its_keep_alive_and_its_lifetime_is_recorded() -> None:
    result = run([request("r1", 0.0)], "single_worker", keep_alive_s=10.0, tick_s=0.5)
    (worker,) = result.workers
    done_at = 2.5 + 10 * 0.1  # first token, then 10 tokens
    assert worker.start_s == 0.0
    assert worker.gpu_memory_bytes == int(2 * GB)
    # scaled to zero on the first tick past keep-alive, stopped 0.1 s later
    assert done_at + 10.0 <= worker.end_s - 0.1 <= done_at + 10.0 + 0.5
    assert worker.end_s - 0.1 == pytest.approx(13.5)


def test_a_warm_request_waits_no_fetch() -> None:
    result = run([request("r1", 0.0), request("r2", 5.0)], "single_worker", keep_alive_s=10.0)
    assert [r.ttft_s for r in result.results] == pytest.approx([2.5, 0.5])
    assert len(result.workers) == 1


def test_a_hydraserve_pipeline_consolidates_and_then_decodes_at_the_whole_worker_tpot() -> None:
    # The policy estimates with its uncalibrated defaults (start-up 2 s, prefill 0.25 s):
    # one worker 2 + 0.25 + 2 = 4.25 s misses a 4 s SLO, two stages 1 + 0.375 + 2 meet it.
    requests = [request("r1", 0.0, ttft_slo_s=4.0, output_tokens=101),
                request("r2", 60.0, ttft_slo_s=4.0, output_tokens=11)]
    result = run(requests, "hydraserve", cluster_=cluster(num_servers=2), keep_alive_s=100.0)
    first, warm = result.results
    degrees = sorted((w.degree, w.stage) for w in result.workers)
    assert degrees == [(2, 0), (2, 1)]
    # each stage fetches 1 GB at 1 GB/s, start-up 1 s: ready at 1 s; prefill 0.5 x 1.5
    assert first.ttft_s == pytest.approx(1.75)
    # stage 0 then fetches the other 1 GB (1 s): tokens at 0.15 s until 2 s, 0.1 s after
    assert first.tpot_s == pytest.approx((0.25 + (100 - 0.25 / 0.15) * 0.1) / 100)
    assert warm.ttft_s == pytest.approx(0.5)
    assert warm.tpot_s == pytest.approx(0.1)
    partial = next(w for w in result.workers if w.stage == 1)
    assert partial.end_s == pytest.approx(2.1)  # stopped on consolidation


def test_a_cold_start_with_no_room_evicts_the_idle_worker_instead_of_waiting_for_keep_alive(
) -> None:
    # one GPU holds one 2 GB worker; m0's is idle from 3.5 s (first token 2.5 s + 10 x 0.1 s)
    requests = [request("r1", 0.0, model="m0-2b"), request("r2", 10.0, model="m1-2b")]
    one_worker = cluster(gpu_gb=3)
    evicting = run(requests, "single_worker", cluster_=one_worker)
    waiting = Simulator(requests, policy=replace(sim_policy("single_worker"), evict_idle=False),
                        cluster=one_worker, config=SimConfig(), size_classes=CLASSES).run()

    # stopped at once, placed 0.1 s later: 0.1 + the 2.5 s cold start
    assert [r.ttft_s for r in evicting.results] == pytest.approx([2.5, 2.6])
    assert evicting.workers[0].end_s == pytest.approx(10.1)
    # keep-alive runs out on the tick at 64 s (3.5 + 60 rounded up): placed at 64.1 s
    assert [r.ttft_s for r in waiting[0]] == pytest.approx([2.5, 64.1 + 2.5 - 10.0])


def test_a_request_past_the_ready_endpoints_slots_scales_out_and_the_extra_one_scales_in(
) -> None:
    # endpoints of 1 slot on 2 servers; r1 (100 tokens after the first) and r2 at once
    burst = [request("r1", 0.0, output_tokens=101), request("r2", 0.0)]
    two = cluster(num_servers=2)
    scaled = run(burst, "single_worker", cluster_=two, max_batch=1, keep_alive_s=10.0,
                 tick_s=0.5)
    one = Simulator(burst, policy=replace(sim_policy("single_worker"), scale_out=False),
                    cluster=two, config=SimConfig(max_batch=1, keep_alive_s=10.0, tick_s=0.5),
                    size_classes=CLASSES).run()

    # endpoint 1 is ready at 2 s (fetch 2 s) and takes r1; r2 scales out then: a second
    # 2 s cold start, first token at 4.5 s
    assert [r.ttft_s for r in scaled.results] == pytest.approx([2.5, 4.5])
    # one endpoint: r2 waits for r1's 100 tokens, done at 12.5 s
    assert [r.ttft_s for r in one[0]] == pytest.approx([2.5, 13.0])
    # the extra endpoint's clock stopped at its placement (2 s): scaled in on the tick at
    # 12 s; the first keeps the model's keep-alive (r1 done at 12.5 s): 22.5 s
    assert [(w.node_id, w.start_s, w.end_s) for w in scaled.workers] == [
        ("0.s0", 0.0, pytest.approx(22.6)), ("0.s1", 2.0, pytest.approx(12.1))]


def test_a_scaled_in_endpoint_finishes_the_request_it_runs_before_it_stops() -> None:
    # 2 slots an endpoint: r1 and r2 on endpoint 1 at 2 s, r3 on the one scaled out then
    # (ready at 4 s); r1 is done at 4.5 s, and 2 requests fit one endpoint: on the tick at
    # 4.5 s each runs one request, so the newer goes, draining r3 (done at 4.5 + 10 s)
    burst = [request("r1", 0.0, output_tokens=21), request("r2", 0.0, output_tokens=201),
             request("r3", 0.0, output_tokens=101)]
    result = run(burst, "single_worker", cluster_=cluster(num_servers=2), max_batch=2,
                 keep_alive_s=1.0, tick_s=0.5)

    assert [(r.status, r.output_tokens) for r in result.results] == [
        ("ok", 21), ("ok", 201), ("ok", 101)]
    assert [r.ttft_s for r in result.results] == pytest.approx([2.5, 2.5, 4.5])
    assert result.results[2].tpot_s == pytest.approx(0.1)
    # stopped 0.1 s after r3's last token; the first endpoint at r2's end (22.5 s) + 1 s
    assert [w.end_s for w in result.workers] == pytest.approx([23.6, 14.6])


def test_the_equal_popularity_workload_is_unchanged_and_zipf_ranks_models_at_random() -> None:
    equal = published_workload(rate=0.7, cv=2.0, duration_s=600.0, seed=3)
    also_equal = published_workload(rate=0.7, cv=2.0, duration_s=600.0, seed=3, zipf_s=0.0)
    weights = popularity_weights(6, zipf_s=1.0, seed=3)

    assert equal == also_equal
    assert sorted(weights, reverse=True) == [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6]
    assert weights != sorted(weights, reverse=True)
    assert popularity_weights(6, zipf_s=0.0, seed=3) == [1.0] * 6


def test_the_host_cache_makes_the_second_cold_start_fetch_from_memory() -> None:
    requests = [request("r1", 0.0), request("r2", 30.0)]
    result = run(requests, "serverless_vllm", keep_alive_s=5.0, cache_bytes=4 * GB)
    assert result.header.name == "sim:serverless_vllm+cache"
    first, second = result.results
    assert first.ttft_s == pytest.approx(3.5)
    # 2 GB at the host-memory 10 GB/s, then start-up and prefill
    assert second.ttft_s == pytest.approx(0.2 + 1.0 + 0.5)
    assert len(result.workers) == 2


def test_a_run_is_the_same_every_time() -> None:
    requests = [request(f"r{i}", i * 0.7, model=f"m{i % 3}-2b") for i in range(20)]
    runs = [run(requests, "hydraserve", cluster_=cluster(num_servers=3)).records()
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_summary_counts_attainment_and_gpu_cost() -> None:
    result = run([request("r1", 0.0, ttft_slo_s=3.0)], "serverless_vllm", keep_alive_s=10.0)
    summary = summarize_run("x", result.results, result.workers)
    assert summary.ttft_attainment == 0.0  # 3.5 s > 3 s
    (worker,) = result.workers
    assert summary.cost_gb_s_per_request == pytest.approx(2 * (worker.end_s - worker.start_s))


def test_calibrate_reads_startup_bandwidth_and_request_times_from_events() -> None:
    events = [
        Event(kind="fetch.done", time=103.0, worker_id="1", model="m",
              data={"num_bytes": 2_000_000_000, "fetch_s": 2.0, "bytes_per_s": 1e9,
                    "cached": False}),
        Event(kind="worker.ready", time=103.5, worker_id="1", model="m",
              data={"phases": {"process_started_at": 101.0, "ready_at": 103.5}}),
        # serverless_vllm: the fetch ended before the process started
        Event(kind="fetch.done", time=200.0, worker_id="2", model="m",
              data={"fetch_s": 4.0, "bytes_per_s": 5e8, "cached": False}),
        Event(kind="worker.ready", time=203.0, worker_id="2", model="m",
              data={"phases": {"process_started_at": 200.5, "ready_at": 203.0}}),
        Event(kind="fetch.done", time=300.0, worker_id="3", model="m",
              data={"fetch_s": 0.1, "bytes_per_s": 2e10, "cached": True}),
        Event(kind="request.done", model="m", request_id="a",
              data={"queue_s": 1.0, "ttft_s": 1.4, "e2e_s": 2.4,
                    "usage": {"completion_tokens": 11}}),
    ]
    calibration = calibrate(events)
    # worker 1: span 2.5 s less its overlapped 2 s fetch; worker 2: span 2.5 s, no overlap
    assert calibration.startup_s == pytest.approx((0.5 + 2.5) / 2)
    assert calibration.fetch_bytes_per_s == pytest.approx(7.5e8)
    assert calibration.models["m"].prefill_s == pytest.approx(0.4)
    assert calibration.models["m"].tpot_s == pytest.approx(0.1)


def test_leaving_out_idle_ticks_changes_no_result() -> None:
    # 3 models competing for 2 GPUs that hold one worker each: cold starts get deferred
    requests = [request(f"r{i}", i * 1.3, model=f"m{i % 3}-2b") for i in range(30)]
    small_gpus = cluster(num_servers=2, gpu_gb=3)
    runs = [run(requests, policy, cluster_=small_gpus, keep_alive_s=2.0,
                skip_idle_ticks=skip).records()
            for policy in ("serverless_vllm", "hydraserve") for skip in (False, True)]
    assert runs[0] == runs[1]
    assert runs[2] == runs[3]
