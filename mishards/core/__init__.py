"""Pure, I/O-free core of the proxy: the file hash ring, the top-k merge and wire-level codecs.

Nothing here opens a socket or reads configuration, so each piece is tested alone against a
brute-force oracle; the gRPC servicer and node clients are thin adapters around it.
"""
