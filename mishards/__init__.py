"""Mishards: a gRPC sharding proxy that makes a cluster of Milvus 0.9.1 nodes look like one server.

Writes go to the single writable node; searches are split by segment file over the read-only
nodes and their top-k results merged. `mishards.core` holds the pure, I/O-free parts.
"""
