"""`rdmakv serve --config FILE`: every serve option from a TOML file (stdlib ``tomllib``), under
its long option's name with ``_`` for ``-`` (``data_dir``, ``capacity``, ``disk_capacity``, ...).
Flags on the command line override the file. An unknown key or a bad value stops the start with
the file, the line and the key; ``--print-config`` shows the effective settings as TOML.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import cast

from ..errors import RdmakvError
from ..units import parse_size

NOT_IN_FILE = {"help", "config", "print_config", "func", "command"}
SIZE_OPTIONS = {"capacity", "disk_capacity", "region_size", "max_frame", "max_write_reservation", "max_inflight"}
MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is not one


class ConfigError(RdmakvError):
    """The config file cannot be read, or names an option or a value serve does not take."""

    code = 23


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The serve options a file may set: dest -> action."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_FILE}


def _line_of(text: str, key: str) -> int:
    m = re.search(rf"^[ \t]*\"?{re.escape(key)}\"?[ \t]*=", text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else 0


def _convert(action: argparse.Action, key: str, value: object) -> object:
    """The file's value as the parsed flag would be, or ValueError saying what was expected."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise ValueError("expected a string or a list of strings")
        return [_convert_one(action, key, v) for v in items]
    return _convert_one(action, key, value)


def _convert_one(action: argparse.Action, key: str, value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a size such as '2GiB'" if key in SIZE_OPTIONS else "expected a string or number")
    if action.type is not None:
        try:
            out = cast(Callable[[str], object], action.type)(str(value))  # (a converter, not a registry name)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ValueError(str(e) or f"not a valid {getattr(action.type, '__name__', 'value')}") from None
    else:
        out = str(value)
        if key in SIZE_OPTIONS:
            parse_size(out)  # raises ValueError naming the problem
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return out


def load(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The options a file sets: dest -> value, checked like the flags."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} B is larger than a config file may be ({MAX_CONFIG_BYTES} B)")
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    known = options(parser)
    out = {}
    for key, value in doc.items():
        where = f"{p}:{_line_of(text, key)}: key {key!r}"
        action = known.get(key)
        if action is None:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if key.replace("-", "_") in known else ""
            raise ConfigError(f"{where}: not a serve option{hint}; the options are {', '.join(sorted(known))}")
        try:
            out[key] = _convert(action, key, value)
        except ValueError as e:
            raise ConfigError(f"{where}: bad value {value!r}: {e}") from None
    return out


def render(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The effective settings as a config file (options left unset are comments)."""
    lines = ["# rdmakv serve: effective settings (flags over --config over defaults)"]
    for dest in sorted(options(parser)):
        value = getattr(args, dest, None)
        if value is None or value == []:
            lines.append(f"# {dest} = (unset)")
        else:
            lines.append(f"{dest} = {json.dumps(value)}")  # JSON's strings, numbers, booleans and lists are TOML
    return "\n".join(lines) + "\n"
