"""HTTP/2 and unary gRPC, spoken by the proxy itself: the protocol state machines without I/O
(`http2`, `grpc_h2`) and their asyncio adapters, the proxy's gRPC server (`server`) and its client
for the nodes (`client`)."""
