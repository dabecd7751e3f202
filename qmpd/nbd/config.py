"""The ``--nbd-server`` and ``--export`` command-line options.

QMP's ``nbd-server-start`` takes QEMU 7.2's legacy address form
(``{"type": "unix", "data": {"path": ...}}``); qemu-storage-daemon's
``--nbd-server`` takes the flat form (``addr.type=unix,addr.path=...``).
qmpd accepts both in both places; :func:`qmpd.net.parse_socket_address`
turns either into an address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpd.errors import ConfigError
from qmpd.keyval import parse_bool, parse_option


@dataclass(frozen=True)
class NbdServerConfig:
    """``--nbd-server``: start the NBD server, as nbd-server-start does."""

    text: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ExportConfig:
    """``--export``: add an export, as block-export-add does."""

    text: str
    options: dict[str, Any]


_SERVER_BOOLS = frozenset({"numeric", "ipv4", "ipv6", "keep-alive", "mptcp", "abstract", "tight"})
_EXPORT_BOOLS = frozenset(
    {"writable", "writethrough", "allow-inactive", "allocation-depth", "fixed-iothread"}
)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise ConfigError(f"Parameter '{key}' expects integer") from None


def parse_nbd_server(text: str) -> NbdServerConfig:
    """``--nbd-server addr.type=unix,addr.path=P[,max-connections=N]`` or JSON."""
    options = parse_option(text)
    if text.lstrip().startswith("{"):
        return NbdServerConfig(text, options)
    if "max-connections" in options:
        options["max-connections"] = _integer(options["max-connections"], "max-connections")
    addr = options.get("addr")
    if isinstance(addr, dict):
        for target in (addr, addr.get("data")):
            if not isinstance(target, dict):
                continue
            for key in list(target):
                if key in _SERVER_BOOLS:
                    target[key] = parse_bool(target[key], key)
                elif key == "to":
                    target[key] = _integer(target[key], key)
    return NbdServerConfig(text, options)


def parse_export(text: str) -> ExportConfig:
    """``--export [type=]nbd,id=ID,node-name=NODE[,name=N][,writable=on]...`` or JSON."""
    if text.lstrip().startswith("{"):
        return ExportConfig(text, parse_option(text))
    options = parse_option(text, implied_key="type")
    for key in list(options):
        if key in _EXPORT_BOOLS:
            options[key] = parse_bool(options[key], key)
    bitmaps = options.get("bitmaps")
    if isinstance(bitmaps, dict):
        # keyval lists: bitmaps.0=a,bitmaps.1.node=n,bitmaps.1.name=b
        try:
            keys = sorted(bitmaps, key=int)
        except ValueError:
            raise ConfigError("Parameter 'bitmaps' expects a list") from None
        options["bitmaps"] = [bitmaps[k] for k in keys]
    return ExportConfig(text, options)
