"""Active health checks with real node processes behind static discovery (host names, not IPs)."""

from __future__ import annotations

from tests.support.processes import LOCALHOST

from ..proxy.conftest import MishardsProcess
from .conftest import NodeCluster, SearchStream, conn_stats, wait_for, wait_for_reading


def test_a_stopped_node_leaves_and_rejoins_after_consecutive_successes(nodes: NodeCluster):
    """Stop one read-only node while searching: searches stay complete; start it again on the same
    port: after HEALTH_CHECK_SUCCESSES_TO_RESTORE passed checks it is routed files again."""
    names = [f"localhost:{node.port}" for node in nodes.readonly]
    proxy = MishardsProcess(
        woserver=f"localhost:{nodes.writable.port}",
        meta_uri=nodes.meta_uri,
        ro_addresses=names,
        log_dir=nodes.log_dir,
        extra_env={
            "HEALTH_CHECK_INTERVAL": "0.3",
            "HEALTH_CHECK_TIMEOUT": "0.5",
            "HEALTH_CHECK_FAILURES_TO_REMOVE": "2",
            "HEALTH_CHECK_SUCCESSES_TO_RESTORE": "3",
            "TIMEOUT": "10",
        },
    ).start()
    victim, name = nodes.readonly[0], names[0]

    def node_stats() -> dict:
        return conn_stats(proxy.address)["readonly"][name]

    try:
        stats = wait_for_reading(
            "every node passed a health check",
            lambda: conn_stats(proxy.address),
            lambda stats: all((node["last_health_check"] or {}).get("ok") for node in stats["readonly"].values()),
        )
        assert set(stats["readonly"]) == set(names)
        assert {node["state"] for node in stats["readonly"].values()} == {"healthy"}
        assert stats["writable"]["address"] == f"localhost:{nodes.writable.port}"
        assert stats["writable"]["last_health_check"]["ok"] is True

        with SearchStream(proxy.address, nodes) as searches:
            wait_for("searches flow", lambda: len(searches.results) >= 5)
            victim.stop()
            wait_for("the stopped node is out of routing", lambda: node_stats()["state"] == "unhealthy", 5)
            gone = wait_for_reading(
                "the checks keep failing", node_stats, lambda stats: stats["checks_failed_in_a_row"] >= 2, 5
            )
            assert gone["last_health_check"]["ok"] is False and gone["last_health_check"]["error"]
            count = len(searches.results)
            wait_for("searches go on without it", lambda: len(searches.results) >= count + 20)

            nodes.restart_readonly(0)  # same port
            back = wait_for_reading("the restarted node is back", node_stats, lambda s: s["state"] == "healthy", 10)
            assert back["checks_passed_in_a_row"] >= 3 and back["last_health_check"]["ok"] is True
            routed = back["files_routed"]
            wait_for("it receives files again", lambda: node_stats()["files_routed"] > routed, 10)
        searches.assert_all_complete(at_least=30)
    finally:
        proxy.stop()
        if not nodes.readonly[0].alive():
            nodes.restart_readonly(0)
    assert proxy.returncode == 0
    assert LOCALHOST not in name


def test_health_checks_alone_take_a_silent_node_out_and_back(nodes: NodeCluster):
    """Without any search traffic, a frozen node (SIGSTOP) leaves after the failure threshold."""
    proxy = MishardsProcess(
        woserver=nodes.writable.address,
        meta_uri=nodes.meta_uri,
        ro_addresses=[n.address for n in nodes.readonly],
        log_dir=nodes.log_dir,
        extra_env={
            "HEALTH_CHECK_INTERVAL": "0.3",
            "HEALTH_CHECK_TIMEOUT": "0.3",
            "HEALTH_CHECK_FAILURES_TO_REMOVE": "3",
            "HEALTH_CHECK_SUCCESSES_TO_RESTORE": "2",
        },
    ).start()
    victim = nodes.readonly[1]

    def victim_stats() -> dict:
        return conn_stats(proxy.address)["readonly"][victim.address]

    try:
        wait_for("a first check", lambda: victim_stats()["last_health_check"] is not None)
        victim.pause()
        try:
            frozen = wait_for_reading("the frozen node is out", victim_stats, lambda s: s["state"] == "unhealthy", 10)
            assert frozen["calls"] == 0, "no search was involved"
            assert frozen["checks_failed_in_a_row"] >= 3
            assert "DEADLINE_EXCEEDED" in frozen["last_health_check"]["error"]
        finally:
            victim.resume()
        wait_for("the resumed node is back", lambda: victim_stats()["state"] == "healthy", 10)
    finally:
        proxy.stop()
