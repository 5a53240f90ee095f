"""A scripted fake read-only node for measuring the proxy alone: real gRPC (grpc.aio), instant answers.

On a 2-core machine real nodes searching beside the proxy saturate first and steal its CPU, so
the proxy's capacity cost (CPU per search at saturation) is measured against this instead
(docs/design.md, "Proxy capacity"): `SearchInFiles` answers a synthetic, correctly shaped
TopKQueryResult for the request's nq and topk (built once per shape), `Cmd` answers version
0.9.1, `ReloadSegments` and `PreloadCollection` succeed, anything else is UNIMPLEMENTED.

    python -m tests.support.fake_node PORT [PORT ...]    # one process serving every port
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np

from milvus_grpc import milvus_pb2 as pb
from milvus_grpc import status_pb2
from utils.milvus_schema import SERVICE

_OK = status_pb2.Status().SerializeToString()
_VERSION = pb.StringReply(string_reply="0.9.1").SerializeToString()


class FakeNode:
    def __init__(self) -> None:
        self._replies: dict[tuple[int, int], bytes] = {}

    def search_reply(self, request: bytes) -> bytes:
        param = pb.SearchInFilesParam.FromString(request).search_param
        shape = (len(param.query_record_array), param.topk)
        reply = self._replies.get(shape)
        if reply is None:
            nq, topk = shape
            rng = np.random.default_rng(nq * 1_000_003 + topk)
            ids = rng.choice(10**9, size=nq * topk, replace=False).astype(np.int64)
            distances = np.sort(rng.random((nq, topk), dtype=np.float32), axis=1).ravel()
            reply = pb.TopKQueryResult(row_num=nq, ids=ids.tolist(), distances=distances.tolist()).SerializeToString()
            self._replies[shape] = reply
        return reply

    def handler(self) -> grpc.GenericRpcHandler:
        async def search(request: bytes, context) -> bytes:
            return self.search_reply(request)

        async def version(request: bytes, context) -> bytes:
            return _VERSION

        async def ok(request: bytes, context) -> bytes:
            return _OK

        methods = {"SearchInFiles": search, "Cmd": version, "ReloadSegments": ok, "PreloadCollection": ok}
        return grpc.method_handlers_generic_handler(
            SERVICE, {name: grpc.unary_unary_rpc_method_handler(call) for name, call in methods.items()}
        )


async def serve(ports: list[int]) -> None:
    server = grpc.aio.server(handlers=[FakeNode().handler()])
    for port in ports:
        if not server.add_insecure_port(f"127.0.0.1:{port}"):
            raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve([int(port) for port in sys.argv[1:]]))
