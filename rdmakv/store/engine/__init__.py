"""The store's state and its rules: namespaces and sessions, the chunk index and its reference
counts, tiering between the slab and the log, publishing to the one-sided index, the log itself,
its replay and compaction. No sockets here: the server (``rdmakv.store.server``) calls the
``Engine``'s public methods."""
