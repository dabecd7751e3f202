"""QEMU's option syntax: ``key=value,key2=value2`` (keyval) or a JSON object.

Keys may be dotted to build nested objects (``addr.type=unix``); ``,,``
stands for a literal comma; an element without ``=`` sets the implied key
when the option has one (``socket,id=x`` for ``--chardev``).
"""

from __future__ import annotations

import json
from typing import Any

from qmpd.errors import ConfigError


def split_elements(text: str) -> list[str]:
    """Split on single commas; ``,,`` is an escaped comma."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            out.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse keyval text into nested dicts of strings."""
    result: dict[str, Any] = {}
    for index, element in enumerate(split_elements(text)):
        if not element:
            if index == 0 and text == "":
                break
            raise ConfigError(f"Invalid parameter '' in '{text}'")
        if "=" in element:
            key, value = element.split("=", 1)
        elif index == 0 and implied_key is not None:
            key, value = implied_key, element
        else:
            raise ConfigError(f"Expected '=' after parameter '{element}'")
        if not key:
            raise ConfigError(f"Invalid parameter '' in '{text}'")
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Parameter '{key}' conflicts with an earlier value")
            node = child
        if parts[-1] in node:
            raise ConfigError(f"Parameter '{key}' is set more than once")
        node[parts[-1]] = value
    return result


def parse_option(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """An option value in either of QEMU's forms: JSON object or keyval."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError("JSON option value must be an object")
        return value
    return parse_keyval(text, implied_key)


def parse_bool(value: Any, name: str) -> bool:
    """QEMU's on/off (and yes/no, true/false) for keyval booleans."""
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")
