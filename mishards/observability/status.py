"""What the status page shows: the nodes, and per collection how its files spread over them.

The spread is what routing would do now: each collection's searchable files (from the meta DB)
assigned by the proxy's own router over the current read-only nodes, unhealthy ones excluded.
Built on the HTTP thread when the page is asked for, never on the search path. No secret is
shown: nodes by address, the meta DB by dialect only.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from utils.errors import NoAvailableNode
from utils.logger import redact

from ..nodes import Membership, NodeClient

WRITABLE = "<writable>"
_FILES_SQL = sa.text(
    "SELECT CASE WHEN t.owner_table = '' OR t.owner_table IS NULL THEN t.table_id ELSE t.owner_table END, "
    "f.id, f.row_count, f.file_size FROM TableFiles f JOIN Tables t ON t.table_id = f.table_id "
    "WHERE f.file_type IN (1, 2, 3) AND t.state <> 1 ORDER BY f.id"
)


class StatusSource:
    """Reads the proxy's state for the status page and the probes."""

    def __init__(
        self,
        *,
        membership: Membership,
        writable: NodeClient,
        router: Any,
        engine: Engine,
        conn_stats: Callable[[], dict],
        serving: Callable[[], bool],
    ) -> None:
        self.membership = membership
        self.writable = writable
        self.router = router
        self.engine = engine
        self.conn_stats = conn_stats
        self.serving = serving

    def readiness(self) -> tuple[bool, str]:
        """Ready when serving and some node can answer searches (a healthy read-only or the writable node)."""
        if not self.serving():
            return False, "the gRPC server is not serving"
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
        files: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        with self.engine.connect() as connection:
            for collection, file_id, row_count, file_size in connection.execute(_FILES_SQL):
                files[collection].append((str(file_id), int(row_count or 0), int(file_size or 0)))
        nodes = self.membership.all()
        unhealthy = {name for name, client in nodes.items() if not client.stats.healthy}
        out = []
        for collection in sorted(files):
            entries = files[collection]
            by_id = {file_id: (rows, size) for file_id, rows, size in entries}
            try:
                groups = self.router.assign(list(by_id), list(nodes), unhealthy)
            except NoAvailableNode:
                groups = {WRITABLE: list(by_id)}
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

    def snapshot(self) -> dict:
        ready, reason = self.readiness()
        try:
            collections, meta_error = self.collections(), ""
        except Exception as exc:  # noqa: BLE001 - the page must still show the nodes
            collections, meta_error = [], redact(f"{exc.__class__.__name__}: {exc}")[:500]
        return {
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "ready": ready,
            "ready_reason": reason,
            "meta_db": self.engine.dialect.name,
            "meta_error": meta_error,
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
"""


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
        f'{html.escape(snapshot["generated_at"])} &middot; <a href="/status.json">JSON</a> &middot; '
        '<a href="/metrics">metrics</a></div>',
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
    parts.append("</table><h2>Collections: files per node (as routed now)</h2>")
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
