"""llama-server's rules for slot filenames."""

from __future__ import annotations

_FORBIDDEN_CHARS = set(':*?"<>|/\\')
_LOOKALIKES = {0xFF0E: "U+FF0E (fullwidth full stop)", 0x2215: "U+2215 (division slash)",
               0x2216: "U+2216 (set minus)", 0xFFFD: "U+FFFD (replacement character)",
               0xFEFF: "U+FEFF (byte order mark)"}  # fmt: skip


def validate_filename(name: str | bytes) -> None:
    """llama-server's fs_validate_filename for slot files (no subdirectories).

    Raises ValueError naming the first rule the name breaks.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8", "strict")
        except UnicodeDecodeError as e:
            raise ValueError(f"filename is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not name:
        raise ValueError("filename is empty")
    try:
        n_bytes = len(name.encode("utf-8", "strict"))
    except UnicodeEncodeError:
        raise ValueError("filename contains a surrogate code point (invalid UTF-8)") from None
    if n_bytes > 255:
        raise ValueError(f"filename is {n_bytes} bytes long, the limit is 255")
    for ch in name:
        _check_code_point(ch)
    if name[0] == " " or name[-1] == " ":
        raise ValueError("filename has a leading or trailing space")
    if ".." in name:
        raise ValueError("filename contains '..'")
    if name[-1] == ".":
        raise ValueError("filename ends with '.'")
    if name == ".":
        raise ValueError("filename is '.'")


def _check_code_point(ch: str) -> None:
    c = ord(ch)
    if c <= 0x1F or c == 0x7F or 0x80 <= c <= 0x9F:
        raise ValueError(f"filename contains control character U+{c:04X}")
    if c in _LOOKALIKES:
        raise ValueError(f"filename contains {_LOOKALIKES[c]}")
    if 0xD800 <= c <= 0xDFFF:
        raise ValueError(f"filename contains surrogate U+{c:04X}")
    if ch in _FORBIDDEN_CHARS:
        what = "a path separator" if ch in "/\\" else "a forbidden character"
        raise ValueError(f"filename contains {what} {ch!r}")
