#!/usr/bin/env python3
"""Container healthcheck: exit 0 when `Cmd version` answers SUCCESS on the local service.

Usage: docker_healthcheck.py PORT_VARIABLE HOST_VARIABLE. The port and bind address are read from
the environment variables named, so the check follows whatever the container was configured with;
a wildcard bind address is probed on 127.0.0.1.
"""

from __future__ import annotations

import os
import sys

import grpc

from milvus_grpc import milvus_pb2, milvus_pb2_grpc  # the installed package (make venv, the images)

WILDCARDS = {"", "0.0.0.0", "[::]", "::"}


def target(port_var: str, host_var: str) -> str:
    """The address to probe, `host:port`."""
    host = os.environ.get(host_var, "")
    host = "127.0.0.1" if host in WILDCARDS else host
    return f"{host}:{os.environ.get(port_var, '19530')}"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} PORT_VARIABLE HOST_VARIABLE", file=sys.stderr)
        return 2
    address = target(argv[1], argv[2])
    with grpc.insecure_channel(address) as channel:
        try:
            reply = milvus_pb2_grpc.MilvusServiceStub(channel).Cmd(milvus_pb2.Command(cmd="version"), timeout=3)
        except grpc.RpcError as exc:
            print(f"unhealthy: {address}: {exc.code().name}", file=sys.stderr)
            return 1
    if reply.status.error_code != 0:
        print(f"unhealthy: {address}: {reply.status.reason}", file=sys.stderr)
        return 1
    print(f"healthy: {address} version {reply.string_reply}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
