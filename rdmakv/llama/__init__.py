"""llama.cpp integration: the slot-file codec (parse, chunk, rebuild), slot files in the store,
the llama-server proxy and the ``rdmakv slotfile`` CLI."""
