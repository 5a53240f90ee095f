"""The proxy's layer map (docs/architecture.md), checked by parsing the code with `ast`: break a
rule and this fails, naming the file and the line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mishards"

TRANSPORTS = {"grpc", "mishards.protocol", "mishards.node_grpcio"}
NODE_COUNTERS = {"failovers", "hedges", "hedges_won", "ejections", "files_routed", "retries"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(path): (path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, tree: ast.Module, is_package: bool = False) -> list[tuple[str, int]]:
    """Every module `module` imports (relative imports resolved; `from x import y` counts as x and
    x.y, so importing a submodule by name is caught), with its line; TYPE_CHECKING blocks included."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def is_under(name: str, modules: set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def violations(modules: list[str], forbidden: set[str]) -> list[str]:
    code = sources()
    return [
        f"{code[m][0].relative_to(ROOT)}:{line} imports {name}"
        for m in modules
        for name, line in imports(m, code[m][1], code[m][0].name == "__init__.py")
        if is_under(name, forbidden)
    ]


def test_the_map_sees_the_package():
    code = sources()
    assert {"mishards.service", "mishards.search", "mishards.core.planner", "mishards.nodes"} <= set(code)
    assert ("mishards.protocol.client", 0) not in imports("mishards.service", code["mishards.service"][1])
    assert any(
        is_under(n, {"mishards.protocol.client"}) for n, _ in imports("mishards.nodes", code["mishards.nodes"][1])
    )


def test_the_service_and_the_search_path_import_no_transport():
    layers = ["mishards.service", "mishards.search", "mishards.core.planner", "mishards.accounting"]
    assert violations(layers, TRANSPORTS) == []


def test_only_nodes_knows_the_node_clients_and_only_main_the_servers():
    code = sources()
    clients = {"mishards.protocol.client", "mishards.node_grpcio"}
    others = [m for m in code if m not in clients | {"mishards.nodes"}]
    assert violations(others, clients) == []
    servers = {"mishards.protocol.server"}
    assert violations([m for m in code if m != "mishards.main"], servers) == []
    grpc_users = [m for m in code if m not in {"mishards.main", "mishards.node_grpcio"}]
    assert violations(grpc_users, {"grpc"}) == []


def test_observability_imports_no_nodes_and_no_search_path():
    code = sources()
    observability = [m for m in code if m.startswith("mishards.observability")]
    forbidden = {"mishards.nodes", "mishards.search", "mishards.service", "mishards.accounting"} | TRANSPORTS
    assert violations(observability, forbidden) == []


def test_the_core_does_no_io_and_knows_no_protocol():
    """The domain core imports neither the protocol package, nor the service, nor anything that
    talks to a node, a database or a socket."""
    code = sources()
    core = [m for m in code if m.startswith("mishards.core")]
    outside = {"mishards.protocol", "mishards.service", "mishards.search", "mishards.nodes", "mishards.meta"}
    io = {"asyncio", "socket", "grpc", "sqlalchemy", "threading", "subprocess"}
    assert violations(core, outside | io) == []


def test_the_planner_is_pure():
    """No I/O, no clock, no nodes: the standard library's abstract types and the error taxonomy only."""
    code = sources()
    names = {name for name, _ in imports("mishards.core.planner", code["mishards.core.planner"][1])}
    assert names and all(is_under(n, {"__future__", "collections.abc", "utils.errors"}) for n in names), names


def test_one_place_decides_to_search_on_the_writable_node():
    """The writable node's name in plans is defined once, and the router's "no read-only node is
    left" (NoAvailableNode) is turned into "the writable node" only by the planner."""
    found = []
    for path, tree in sources().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "WRITABLE" for t in node.targets
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} defines WRITABLE")
            if isinstance(node, ast.Constant) and node.value == "<writable>":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} spells the sentinel")
            if isinstance(node, ast.ExceptHandler) and "NoAvailableNode" in ast.unparse(node.type or ast.Name("")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} catches NoAvailableNode")
    planner = "mishards/core/planner.py"
    assert [f for f in found if not f.startswith(planner)] == []
    assert sum(f.startswith(planner) and "defines WRITABLE" in f for f in found) == 1


def test_one_place_records_a_node_calls_outcome():
    """Node counters (conn_stats and Prometheus alike) are written, and `NodeClient.record` is
    called, only by accounting.py."""
    found = []
    for module, (path, tree) in sources().items():
        if module == "mishards.accounting":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.AugAssign)
                and isinstance(node.target, ast.Attribute)
                and node.target.attr in NODE_COUNTERS
                and not (isinstance(node.target.value, ast.Name) and node.target.value.id == "self")
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} counts {ast.unparse(node.target)}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "record"
                and "reloads" not in ast.unparse(node.func.value)
                and module != "mishards.nodes"
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} records {ast.unparse(node)}")
    assert found == []
