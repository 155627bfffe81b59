"""The ``rdmakv`` command (main.py) and its tools: the demo, doctor, top, and server settings."""
