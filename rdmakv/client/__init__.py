"""The client API: ``connect`` and ``Store`` (store.py), the calls every transport makes
(calls.py), reports (reports.py), registered buffers (bufpool.py) and URLs (url.py).

Kept empty on purpose: lower layers import ``rdmakv.client.reports`` without pulling in the
client itself. The public names are re-exported by the root package."""
