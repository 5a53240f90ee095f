"""What the status page shows: readiness, uptime, the effective settings, request rates, the
nodes, and per collection how its files spread over them.

The spread is what routing would do now: each collection's searchable files (the meta reader's)
planned by the search path's own planner over the current read-only nodes, so the page and the
searches cannot disagree (unhealthy nodes left out; all on the writable node when none is healthy).
Built on the HTTP thread when the page is asked for, never on the search path. No secret is
shown: nodes by address, the meta DB by dialect only.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from utils.logger import redact

from .health import MetaMonitor
from .metrics import Metrics, NoMetrics

if TYPE_CHECKING:
    from ..core.planner import Planner
    from ..meta import MetaReader


class StatusSource:
    """Reads the proxy's state for the status page and the probes."""

    def __init__(
        self,
        *,
        membership: Any,
        writable: Any,
        planner: Planner,
        meta: MetaReader,
        conn_stats: Callable[[], dict],
        serving: Callable[[], bool],
        meta_monitor: MetaMonitor | None = None,
        metrics: Metrics | None = None,
        settings_summary: dict | None = None,
        started_at: float | None = None,
    ) -> None:
        """`membership` and `writable` are read as `nodes.Membership` and `nodes.NodeClient` (duck
        typed: observability imports no nodes)."""
        self.membership = membership
        self.writable = writable
        self.planner = planner
        self.meta = meta
        self.conn_stats = conn_stats
        self.serving = serving
        self.meta_monitor = meta_monitor
        self.metrics = metrics if metrics is not None else NoMetrics()
        self.settings_summary = settings_summary or {}
        self.started_at = time.time() if started_at is None else started_at
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(maxlen=64)
        self._samples_lock = threading.Lock()

    def readiness(self) -> tuple[bool, str]:
        """Ready when serving, the meta DB can be read and some node can answer searches (a healthy
        read-only or the writable node)."""
        if not self.serving():
            return False, "the gRPC server is not serving"
        if self.meta_monitor is not None:
            readable, reason = self.meta_monitor.state()
            if not readable:
                return False, f"meta DB unreadable: {reason}"
        if self.writable.stats.healthy or any(c.stats.healthy for c in self.membership.all().values()):
            return True, "ok"
        return False, "no healthy node: the writable node and every read-only node are down"

    def nodes(self) -> list[dict]:
        stats = self.conn_stats()
        rows = [{"name": self.writable.name, "role": "writable", **stats["writable"]}]
        rows += [{"name": name, "role": "readonly", **row} for name, row in stats["readonly"].items()]
        rows += [
            {"name": name, "role": "readonly", "address": address, "healthy": False, "waiting": True}
            for name, address in sorted(stats["waiting"].items())
        ]
        for row in rows:  # `health` colours the row; `state` keeps the membership's own word when it has one
            row["health"] = "waiting" if row.get("waiting") else ("healthy" if row["healthy"] else "unhealthy")
            row["state"] = row.get("state") or row["health"]
        return rows

    def collections(self) -> list[dict]:
        files = self.meta.searchable_files_by_collection()
        health = {name: client.stats.healthy for name, client in self.membership.all().items()}
        out = []
        for collection in sorted(files):
            entries = files[collection]
            by_id = {file_id: (rows, size) for file_id, rows, size in entries}
            groups = self.planner.first(list(by_id), health)
            spread = [
                {
                    "node": node,
                    "files": len(ids),
                    "rows": sum(by_id[i][0] for i in ids),
                    "bytes": sum(by_id[i][1] for i in ids),
                }
                for node, ids in sorted(groups.items())
            ]
            out.append(
                {"collection": collection, "files": len(entries), "rows": sum(e[1] for e in entries), "spread": spread}
            )
        return out

    def requests(self) -> list[dict]:
        """Per method: totals, and requests and errors per second over the last minute or so (between
        this call and the oldest page view within 60 s; since start on the first view)."""
        if not self.metrics.enabled:
            return []
        now = time.monotonic()
        all_series = dict(self.metrics.rpc_series())
        counts = {method: (series.requests, series.errors) for method, series in all_series.items()}
        with self._samples_lock:
            while self._samples and now - self._samples[0][0] > 60:
                self._samples.popleft()
            base_time, base = self._samples[0] if self._samples else (now - self.uptime(), {})
            if not self._samples or now - self._samples[-1][0] >= 1:
                self._samples.append((now, counts))
        window = max(now - base_time, 1e-6)
        rows = []
        for method, (requests, errors) in sorted(counts.items()):
            if not requests:
                continue
            old_requests, old_errors = base.get(method, (0, 0))
            series = all_series[method]
            rows.append(
                {
                    "method": method,
                    "requests": requests,
                    "errors": errors,
                    "requests_per_s": round((requests - old_requests) / window, 3),
                    "errors_per_s": round((errors - old_errors) / window, 3),
                    "window_s": round(window, 1),
                    "mean_ms": round(1000 * series.latency.total / requests, 3),
                    "latency_ms": series.latency.quantiles_ms((0.5, 0.99)),
                }
            )
        return rows

    def uptime(self) -> float:
        return max(time.time() - self.started_at, 0.0)

    def snapshot(self) -> dict:
        ready, reason = self.readiness()
        meta_error = ""
        if self.meta_monitor is not None:
            readable, why = self.meta_monitor.state()
            meta_error = "" if readable else why
        collections: list[dict] = []
        if not meta_error:
            try:
                collections = self.collections()
            except Exception as exc:  # noqa: BLE001 - the page must still show the nodes
                meta_error = redact(f"{exc.__class__.__name__}: {exc}")[:500]
        return {
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started_at)),
            "uptime_s": round(self.uptime(), 1),
            "ready": ready,
            "ready_reason": reason,
            "meta_db": self.meta.engine.dialect.name,
            "meta_error": meta_error,
            "settings": self.settings_summary,
            "requests": self.requests(),
            "nodes": self.nodes(),
            "collections": collections,
        }


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f7f8fa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: #5b6475; font-size: 13px; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px #0002; font-size: 14px; }
th, td { padding: 6px 12px; border-bottom: 1px solid #e3e6eb; text-align: left; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: 600; border-radius: 10px; padding: 2px 9px; font-size: 12px; }
.healthy { background: #d9f2e3; color: #14633a; } .unhealthy { background: #fbdcdc; color: #8c1d1d; }
.waiting { background: #fdf0cf; color: #7a5800; }
.ready { color: #14633a; font-weight: 600; } .notready { color: #8c1d1d; font-weight: 600; }
.bar { background: #e3e6eb; width: 160px; height: 10px; border-radius: 5px; display: inline-block; }
.bar span { background: #3f7be0; height: 10px; border-radius: 5px; display: block; }
.err { color: #8c1d1d; font-size: 12px; white-space: normal; max-width: 380px; }
.legend { color: #5b6475; font-size: 12px; max-width: 900px; margin-top: 6px; }
"""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def _setting_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _cell(value: Any, numeric: bool = False) -> str:
    return f'<td class="num">{html.escape(str(value))}</td>' if numeric else f"<td>{html.escape(str(value))}</td>"


def render_html(snapshot: dict) -> str:
    """The snapshot as a page a person reads; refreshes itself every 5 seconds."""
    readiness = (
        '<span class="ready">ready</span>'
        if snapshot["ready"]
        else f'<span class="notready">not ready: {html.escape(snapshot["ready_reason"])}</span>'
    )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">',
        f"<title>Mishards status</title><style>{_STYLE}</style></head><body>",
        "<h1>Mishards status</h1>",
        f'<div class="sub">{readiness} &middot; meta DB: {html.escape(snapshot["meta_db"])} &middot; '
        f"up {_duration(snapshot.get('uptime_s', 0))} (since {html.escape(snapshot.get('started_at', ''))}) "
        f'&middot; {html.escape(snapshot["generated_at"])} &middot; <a href="/status.json">JSON</a> &middot; '
        '<a href="/metrics">metrics</a></div>',
    ]
    if snapshot.get("settings"):
        parts.append("<h2>Settings in effect</h2><table><tr><th>setting</th><th>value</th></tr>")
        for key, value in snapshot["settings"].items():
            parts.append("<tr>" + _cell(key) + _cell(_setting_value(value)) + "</tr>")
        parts.append("</table>")
    if snapshot.get("requests"):
        parts.append(
            "<h2>Requests</h2><table><tr><th>method</th><th>requests</th><th>errors</th><th>requests/s</th>"
            "<th>errors/s</th><th>mean ms</th><th>p50 ms</th><th>p99 ms</th></tr>"
        )
        for row in snapshot["requests"]:
            p50, p99 = (row["latency_ms"] + [None, None])[:2]
            parts.append(
                "<tr>"
                + _cell(row["method"])
                + _cell(row["requests"], True)
                + _cell(row["errors"], True)
                + _cell(f"{row['requests_per_s']:.2f}", True)
                + _cell(f"{row['errors_per_s']:.2f}", True)
                + _cell(row["mean_ms"], True)
                + _cell(p50 if p50 is not None else "", True)
                + _cell(p99 if p99 is not None else "", True)
                + "</tr>"
            )
        window = snapshot["requests"][0]["window_s"]
        parts.append(
            "</table>"
            f'<div class="legend">Rates over the last {window:g} s (between page views, at most 60 s; since start '
            "on the first view). Errors are replies with a non-zero Milvus status. Latency is the time from the "
            "request's arrival to its reply inside the proxy (nodes' time included, network to the client not); "
            "p50 and p99 are upper bounds of the histogram bucket that holds that quantile (buckets of "
            "0.5 ms to 60 s, as in /metrics <code>mishards_request_duration_seconds</code>).</div>"
        )
    if snapshot.get("workers"):  # SERVER_WORKERS > 1: the supervisor merged the workers' pages
        parts.append(
            "<h2>Workers</h2><table><tr><th>worker</th><th>pid</th><th>state</th><th>ready</th><th>restarts</th>"
            "<th>up</th><th>requests</th></tr>"
        )
        for row in snapshot["workers"]:
            parts.append(
                "<tr>"
                + _cell(row["worker"], True)
                + _cell(row["pid"] or "", True)
                + _cell(row["state"])
                + _cell("yes" if row["ready"] else "no")
                + _cell(row["restarts"], True)
                + _cell(_duration(row["uptime_s"]))
                + _cell(row["requests"], True)
                + "</tr>"
            )
        parts.append(
            '</table><div class="legend">Requests, errors and node calls above and below are summed over the '
            "workers; p50 and p99 are the highest of the workers' (the whole's are not higher); node states and "
            "collections are as the first serving worker sees them (every worker checks the same nodes).</div>"
        )
    parts += [
        "<h2>Nodes</h2><table><tr><th>node</th><th>role</th><th>address</th><th>state</th><th>version</th>"
        "<th>calls</th><th>failures</th><th>failovers</th><th>hedges</th><th>hedges won</th><th>ejections</th>"
        "<th>files routed</th><th>latency ms</th><th>last error</th></tr>",
    ]
    for node in snapshot["nodes"]:
        parts.append(
            "<tr>"
            + _cell(node["name"])
            + _cell(node["role"])
            + _cell(node["address"])
            + f'<td><span class="state {node["health"]}">{html.escape(str(node["state"]))}</span></td>'
            + _cell(node.get("version", ""))
            + _cell(node.get("calls", 0), True)
            + _cell(node.get("failures", 0), True)
            + _cell(node.get("failovers", 0), True)
            + _cell(node.get("hedges", 0), True)
            + _cell(node.get("hedges_won", 0), True)
            + _cell(node.get("ejections", 0), True)
            + _cell(node.get("files_routed", 0), True)
            + _cell(node.get("latency_ms", ""), True)
            + f'<td class="err">{html.escape(node.get("last_error", ""))}</td></tr>'
        )
    parts.append(
        '</table><div class="legend">Node latency ms: moving average of this node\'s search and health-check '
        "calls as the proxy timed them.</div><h2>Collections: files per node (as routed now)</h2>"
    )
    if snapshot["meta_error"]:
        parts.append(f'<p class="err">meta DB unreadable: {html.escape(snapshot["meta_error"])}</p>')
    elif not snapshot["collections"]:
        parts.append('<p class="sub">no collection has searchable (flushed) files yet</p>')
    else:
        parts.append(
            "<table><tr><th>collection</th><th>node</th><th>files</th><th>rows</th><th>MB</th>"
            "<th>share of files</th></tr>"
        )
        for entry in snapshot["collections"]:
            for i, spread in enumerate(entry["spread"]):
                share = 100.0 * spread["files"] / max(entry["files"], 1)
                name = f"{entry['collection']} ({entry['files']} files, {entry['rows']} rows)" if i == 0 else ""
                parts.append(
                    "<tr>"
                    + _cell(name)
                    + _cell(spread["node"])
                    + _cell(spread["files"], True)
                    + _cell(spread["rows"], True)
                    + _cell(f"{spread['bytes'] / 1e6:.2f}", True)
                    + f'<td><span class="bar"><span style="width:{share:.0f}%"></span></span> '
                    f"{share:.0f}%</td></tr>"
                )
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
