"""Reading YAML from users safely: config files, sweep files and ``--attn KEY=VALUE`` values.

A file must be a regular file of at most `MAX_BYTES`, UTF-8 text. The loader is PyYAML's SafeLoader
(no Python objects) that also refuses aliases (``*name``: an alias bomb expands a small file into
billions of nodes) and nesting deeper than `MAX_DEPTH` (the composer recurses per level). Every
failure is one line that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20  # 1 MiB: a config or sweep file is a few hundred bytes
MAX_DEPTH = 32


class _BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with a nesting limit."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels is not allowed", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _one_line(err: Exception) -> str:
    """PyYAML's message (problem, position, source excerpt) on one line; the caller names the file."""
    return " ".join(str(err).replace('in "<unicode string>", ', "at ").split())


def parse_yaml(text: str, what: str) -> Any:
    """The YAML document in `text`; `what` names the source in the error ("config file 'x.yaml'")."""
    try:
        return yaml.load(text, Loader=_BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {_one_line(err)}") from None


def read_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """The YAML document of file `path`, checked as described in the module docstring."""
    if not str(path).strip():
        raise ConfigError(f"{what} path is empty")
    p = Path(path)
    label = f"{what} {str(p)!r}"
    if not p.exists():
        raise ConfigError(f"{label} does not exist (no such file)")
    if not p.is_file():
        raise ConfigError(f"{label} is not a regular file")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{label} cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{label} is larger than {MAX_BYTES // 1024} KiB; a config file is a few lines of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); is it a binary file?") from None
    if "\x00" in text:
        raise ConfigError(f"{label} holds NUL bytes; is it a binary file?")
    return parse_yaml(text, label)
