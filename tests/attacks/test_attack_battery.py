"""The attack battery, short: each attack of bench/attacks.py for ~2 s against a proxy on its own
HTTP/2 server, while a legitimate grpcio client searches. Relaxed but meaningful: no legitimate
call fails, the proxy's RSS grows by less than 256 MB, and where docs/front-door.md says the
connection ends (a budget, a size rule, a timeout), the attacker's connections end that way.

The proxy runs with short handshake and idle timeouts (H2_HANDSHAKE_TIMEOUT, H2_IDLE_TIMEOUT
0.5 s) so that the timeouts are visible within the attack's 2 s, and a 64 MiB message limit
(H2_MAX_MESSAGE_SIZE): a gzip bomb or a huge stream may hold up to the limit before it is refused,
and at the default 256 MiB that alone sits at the 256 MB bound. The full battery (`make attacks`)
uses the defaults and compares with grpcio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import attacks

pytestmark = pytest.mark.timeout(900)

SECONDS = 2.0
# Attacks whose expected end is a timeout get longer: opening 500 connections takes about a
# second here, and timeouts are checked once a second.
LONGER = {"silent_500": 4.0, "idle_500": 4.0, "slowloris": 4.0}
LIMITS = {"H2_HANDSHAKE_TIMEOUT": "0.5", "H2_IDLE_TIMEOUT": "0.5", "H2_MAX_MESSAGE_SIZE": str(64 << 20)}

# How the attacker's connections must end, where the contract says they end (a prefix of
# Conn.ended()); None: the contract lets them live (budgets not exhausted, limits not reached).
ENDS = {
    "window_update_flood": None,
    "settings_window_entries": "GOAWAY ENHANCE_YOUR_CALM too_many_settings",
    "rapid_reset_same_write": "GOAWAY ENHANCE_YOUR_CALM too_many_resets",
    "rapid_reset_second_write": "GOAWAY ENHANCE_YOUR_CALM too_many_resets",
    "ping_flood_no_read": "reset",  # it never reads the GOAWAY: it sees its writes fail
    "ping_flood_reading": "GOAWAY ENHANCE_YOUR_CALM too_many_pings",
    "settings_flood": "GOAWAY ENHANCE_YOUR_CALM too_many_settings",
    "empty_continuation_flood": "GOAWAY ENHANCE_YOUR_CALM",
    "partial_16mib_frames": "GOAWAY FRAME_SIZE_ERROR",
    "partial_max_frames": None,
    "silent_500": "GOAWAY PROTOCOL_ERROR",  # the handshake timeout
    "idle_500": "GOAWAY NO_ERROR",  # the idle timeout
    "big_stream_2gib": None,
    "gzip_bomb": None,
    "unfinished_bodies": None,
    "header_70kb": None,
    "slowloris": "GOAWAY PROTOCOL_ERROR",  # the preface trickles in slower than the handshake timeout
    "connections_2000": None,
    "zero_window_reader": None,
    "hpack_bomb": "GOAWAY ENHANCE_YOUR_CALM",
    "garbage_after_preface": "GOAWAY",
}


@pytest.fixture(scope="module")
def proxy_cluster() -> Iterator[attacks.Cluster]:
    with attacks.cluster(["http2"], LIMITS, rows=1000) as running:
        yield running


def test_every_attack_has_an_expectation() -> None:
    assert set(ENDS) == set(attacks.ATTACKS)


@pytest.mark.parametrize("name", list(attacks.ATTACKS))
def test_attack(proxy_cluster: attacks.Cluster, name: str) -> None:
    if not proxy_cluster.proxies["http2"].alive():
        pytest.fail("the proxy died during an earlier attack")
    row = attacks.measure(proxy_cluster, "http2", name, LONGER.get(name, SECONDS), rss_abort_mb=1024)
    report = attacks.table([row])
    assert proxy_cluster.proxies["http2"].alive(), f"the proxy died:\n{report}"
    assert not row.aborted, report
    assert row.calls > 0 and not row.errors, f"the legitimate client suffered:\n{report}"
    assert row.rss_growth_mb < 256, report
    assert not any("attacker error" in note for note in row.attacker.get("notes", [])), report
    expected = ENDS[name]
    ended = row.attacker.get("ended", {})
    if expected is not None:
        assert any(what.startswith(expected) for what in ended), (
            f"expected connections to end with {expected}:\n{report}"
        )
