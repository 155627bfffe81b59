"""Multi-node: cluster membership in etcd (placement, replicas and repair build on it)."""
