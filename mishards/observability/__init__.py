"""Observability of the proxy: Prometheus metrics, the per-RPC wrapper, and the HTTP status server.

Everything here is off unless asked for (METRICS_PORT, TRACER_CLASS_NAME); when off, the
service's handlers are the bare ones and the search path runs on `metrics.NoMetrics`, which
records nothing.
"""
