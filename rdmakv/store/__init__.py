"""The server side: the engine (namespaces, chunk index, refcounts), its durable segment log,
the TCP server loop, and helpers that run a server embedded or as a child process."""
