"""Pure, I/O-free domain core of the proxy: the file hash ring, the search planner, the top-k merge,
the wire-level codecs of Milvus replies and the hedging policy.

Nothing here opens a socket or reads configuration, so each piece is tested alone (against a
brute-force oracle where there is one); the service, the node clients and the protocol package
are adapters around it.
"""
