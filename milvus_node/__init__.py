"""A compact Milvus 0.9.1-compatible node: the same protocol, meta schema, storage layout and roles.

Real Milvus 0.9.1 servers cannot run on our machines; this node stands in for them behind
Mishards, in `make run`, in the tests and in the benchmarks. Search is exact (FLAT).
"""
