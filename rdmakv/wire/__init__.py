"""Pure codecs: manifests, chunking, frames and their MAC, payload messages, auth keys.

Bytes in, objects out: nothing here opens a socket, a file or a verbs resource.
"""
