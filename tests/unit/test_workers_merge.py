"""Merging the workers' side-port pages (SERVER_WORKERS): /metrics text and status snapshots."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mishards.observability.metrics import Metrics, merge_exposition, supervisor_families


def _samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def _worker(searches: int, seconds: float, healthy: bool) -> str:
    metrics = Metrics()
    for _ in range(searches):
        metrics.rpc("Search").observe(seconds, 0)
    metrics.rpc("Search").observe(seconds, 1)  # one error each
    metrics.node("ro-1").errors += 2

    class Stats:
        pass

    class Client:
        name = "writable"
        stats = Stats()

    Client.stats.healthy = healthy

    class Membership:
        def all(self):
            return {}

        def waiting(self):
            return {}

    metrics.watch(Membership(), Client())
    return generate_latest(metrics.registry).decode()


def test_counters_and_histograms_are_summed_node_health_is_the_first_workers() -> None:
    merged = _samples(merge_exposition([_worker(3, 0.002, True), _worker(5, 0.2, False)]))
    assert merged[("mishards_requests_total", (("method", "Search"),))] == 3 + 1 + 5 + 1
    assert merged[("mishards_request_errors_total", (("method", "Search"),))] == 2
    assert merged[("mishards_node_errors_total", (("node", "ro-1"),))] == 4
    count = ("mishards_request_duration_seconds_count", (("method", "Search"),))
    assert merged[count] == 10
    fast = ("mishards_request_duration_seconds_bucket", (("le", "0.0025"), ("method", "Search")))
    assert merged[fast] == 4, "the first worker's 4 calls of 2 ms; the second's 200 ms are above"
    total = ("mishards_request_duration_seconds_sum", (("method", "Search"),))
    assert abs(merged[total] - (4 * 0.002 + 6 * 0.2)) < 1e-9
    healthy = ("mishards_node_healthy", (("node", "writable"), ("role", "writable")))
    assert merged[healthy] == 1, "node health as the first worker sees it, not a sum"
    assert merged[("process_start_time_seconds", ())] > 0


def test_process_series_add_up_and_the_supervisor_series_are_appended() -> None:
    one = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n"
    one += "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 100\n"
    one += "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 10\n"
    two = one.replace("1.5", "2.25").replace(" 100", " 90").replace(" 10\n", " 30\n")
    merged = _samples(merge_exposition([one, two], supervisor_families(configured=2, serving=1, restarts=3)))
    assert merged[("process_cpu_seconds_total", ())] == 3.75
    assert merged[("process_start_time_seconds", ())] == 90, "the earliest start"
    assert merged[("process_resident_memory_bytes", ())] == 40, "the proxy's whole memory"
    assert merged[("mishards_workers", (("state", "configured"),))] == 2
    assert merged[("mishards_workers", (("state", "serving"),))] == 1
    assert merged[("mishards_worker_restarts_total", ())] == 3


def test_status_pages_merge_counts_and_keep_the_first_workers_node_states(tmp_path) -> None:
    from mishards.settings import load_settings
    from mishards.workers import Supervisor, Worker, merge_snapshots

    settings = load_settings(
        environ={"WOSERVER": "tcp://127.0.0.1:1", "SQLALCHEMY_DATABASE_URI": "sqlite://", "SERVER_WORKERS": "2"}
    )
    supervisor = Supervisor(settings, 19530, tmp_path, workers=[Worker(0), Worker(1)])

    def page(requests: int, p99: float, calls: int, state: str, ready: bool) -> dict:
        return {
            "ready": ready,
            "ready_reason": "ok" if ready else "meta DB unreadable: gone",
            "meta_db": "sqlite",
            "meta_error": "",
            "settings": {"server_workers": 2},
            "requests": [
                {
                    "method": "Search",
                    "requests": requests,
                    "errors": 1,
                    "requests_per_s": 2.0,
                    "errors_per_s": 0.5,
                    "window_s": 10.0,
                    "mean_ms": 1.0 * requests,
                    "latency_ms": [1.0, p99],
                }
            ],
            "nodes": [{"name": "ro-1", "role": "readonly", "state": state, "health": state, "calls": calls}],
            "collections": [],
        }

    merged = merge_snapshots(
        supervisor, {0: page(10, 5.0, 7, "healthy", True), 1: page(30, 25.0, 3, "unhealthy", False)}
    )
    search = merged["requests"][0]
    assert (search["requests"], search["errors"], search["requests_per_s"]) == (40, 2, 4.0)
    assert search["mean_ms"] == (10 * 10 + 30 * 30) / 40
    assert search["latency_ms"] == [1.0, 25.0], "the highest p99 of the workers"
    assert merged["nodes"] == [
        {"name": "ro-1", "role": "readonly", "state": "healthy", "health": "healthy", "calls": 10}
    ]
    assert not merged["ready"] and merged["ready_reason"] == "meta DB unreadable: gone (worker 1)"
    assert [row["requests"] for row in merged["workers"]] == [10, 30]


def test_a_reason_every_worker_gives_is_said_once_as_it_is() -> None:
    from mishards.workers import not_ready_reason

    assert not_ready_reason({0: "meta DB unreadable: x", 1: "meta DB unreadable: x"}, 2) == "meta DB unreadable: x"
    assert not_ready_reason({0: "a", 1: "b", 2: "a"}, 3) == "a (workers 0, 2); b (worker 1)"
