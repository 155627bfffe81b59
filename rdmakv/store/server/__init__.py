"""The store's network side: the event loop and its connections, request handlers, the write
path, the RDMA exporter, metrics, logs and systemd notification, and the process harness
(``run_server``, an embedded server, a spawned one)."""
