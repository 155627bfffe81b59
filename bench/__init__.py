"""Benchmarks (`rdmakv bench`): RDMA vs TCP vs a v1 single blob, the link's own limit, JSON + report + plots."""
