"""Command line: qemu-storage-daemon style options, processed in order.

Options that create something (``--chardev``, ``--monitor``, ``--qmp``,
``--http``) become an ordered list of actions the daemon carries out one
after the other at start-up, so later options may refer to earlier ones.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qmpd import __version__
from qmpd.errors import ConfigError
from qmpd.keyval import parse_bool, parse_option
from qmpd.nbd.config import ExportConfig, NbdServerConfig, parse_export, parse_nbd_server
from qmpd.qmp.budget import DEFAULT_QMP_INPUT_TOTAL
from qmpd.qmp.server import (
    DEFAULT_OUTPUT_LIMIT,
    InetAddress,
    MonitorConfig,
    SocketAddress,
    UnixAddress,
)

DEFAULT_QMP_SOCKET = "qmpd.sock"
DEFAULT_HTTP = "127.0.0.1:9180"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class HttpConfig:
    """Where the health and metrics endpoints listen."""

    host: str
    port: int


@dataclass(frozen=True)
class BlockdevConfig:
    """A node to create at start-up, as with blockdev-add."""

    text: str
    options: dict[str, Any]


Action = MonitorConfig | HttpConfig | BlockdevConfig | NbdServerConfig | ExportConfig


@dataclass
class Config:
    """Everything the command line asked for."""

    actions: list[Action] = field(default_factory=list)
    paused: bool = False
    incoming: str | None = None
    name: str | None = None
    pidfile: str | None = None
    daemonize: bool = False
    log_level: str = "info"
    qemu_version: tuple[int, int, int] = (7, 2, 0)
    package: str = f"qmpd {__version__}"
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    qmp_input_total: int = DEFAULT_QMP_INPUT_TOTAL
    event_loop: str = "asyncio"
    used_defaults: bool = False

    @property
    def monitors(self) -> list[MonitorConfig]:
        return [a for a in self.actions if isinstance(a, MonitorConfig)]

    @property
    def http(self) -> list[HttpConfig]:
        return [a for a in self.actions if isinstance(a, HttpConfig)]

    def version_info(self) -> dict[str, Any]:
        major, minor, micro = self.qemu_version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.package}


class _Ordered(argparse.Action):
    """Keep (option, value) pairs of the repeatable options in command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, "ordered", None) or []
        items.append((self.dest, values))
        namespace.ordered = items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmpd",
        description="A QMP-speaking block-device daemon that answers like QEMU 7.2.",
        epilog=(
            "With no --qmp, --monitor or --http option, qmpd listens on "
            f"unix:./{DEFAULT_QMP_SOCKET} and serves HTTP on {DEFAULT_HTTP}."
        ),
    )
    p.add_argument("-V", "--version", action="version", version=f"qmpd {__version__}")
    p.add_argument("--qmp", action=_Ordered, metavar="unix:PATH|tcp:HOST:PORT",
                   help="a QMP monitor listening at this address")
    p.add_argument("--chardev", action=_Ordered, metavar="socket,id=ID,path=PATH|host=H,port=P",
                   help="a socket character device for --monitor (server=on,wait=off)")
    p.add_argument("--monitor", action=_Ordered, metavar="chardev=ID[,pretty=on]",
                   help="a QMP monitor on a --chardev")
    p.add_argument("--http", action=_Ordered, metavar="[HOST:]PORT",
                   help="serve /health, /ready and /metrics here (loopback by default)")
    p.add_argument("--blockdev", action=_Ordered, metavar="OPTIONS",
                   help="a block node, as blockdev-add takes it (keyval or JSON)")
    p.add_argument("--nbd-server", action=_Ordered, metavar="addr.type=unix,addr.path=PATH",
                   help="start the NBD server, as nbd-server-start (keyval or JSON)")
    p.add_argument("--export", action=_Ordered, metavar="[type=]nbd,id=ID,node-name=NODE",
                   help="export a node, as block-export-add (keyval or JSON)")
    p.add_argument("-S", "--paused", action="store_true",
                   help="start in prelaunch instead of running (like QEMU's -S)")
    p.add_argument("--incoming", metavar="defer|URI",
                   help="wait for an incoming migration (run state inmigrate)")
    p.add_argument("--name", help="name reported by query-name")
    p.add_argument("-m", "--memory", metavar="SIZE",
                   help="accepted for command-line compatibility with QEMU; ignored")
    p.add_argument("--pidfile", metavar="PATH", help="write the pid here once ready")
    p.add_argument("--daemonize", action="store_true",
                   help="detach once ready; the parent exits 0 when the daemon is ready")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="stderr log level")
    p.add_argument("--qmp-version", metavar="MAJOR.MINOR.MICRO", default="7.2.0",
                   help="QEMU version reported in the greeting and query-version")
    p.add_argument("--qmp-package", metavar="TEXT", default=None,
                   help="package string reported next to the version")
    p.add_argument("--event-loop", choices=["auto", "asyncio", "uvloop"], default="asyncio",
                   help="asyncio (default), uvloop (if installed), or auto: uvloop when installed")
    p.add_argument("--max-client-output", type=int, metavar="BYTES",
                   default=DEFAULT_OUTPUT_LIMIT,
                   help="output queued for one client before it is disconnected")
    p.add_argument("--max-qmp-input-total", type=int, metavar="BYTES",
                   default=DEFAULT_QMP_INPUT_TOTAL,
                   help="unfinished QMP input held across all clients; a message that "
                        "would exceed it is refused like an oversized one")
    return p


def parse_args(argv: Sequence[str]) -> Config:
    """Turn argv into a Config; ConfigError names the offending option."""
    ns = build_parser().parse_args(list(argv))
    cfg = Config(
        paused=ns.paused,
        incoming=ns.incoming,
        name=ns.name,
        pidfile=ns.pidfile,
        daemonize=ns.daemonize,
        log_level=ns.log_level,
        output_limit=ns.max_client_output,
        qmp_input_total=ns.max_qmp_input_total,
        event_loop=ns.event_loop,
    )
    if ns.max_qmp_input_total < 0:
        raise ConfigError("--max-qmp-input-total: must not be negative")
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", ns.qmp_version)
    if m is None:
        raise ConfigError(f"--qmp-version {ns.qmp_version}: expected MAJOR.MINOR.MICRO")
    cfg.qemu_version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if ns.qmp_package is not None:
        cfg.package = ns.qmp_package
    chardevs: dict[str, SocketAddress] = {}
    used_chardevs: set[str] = set()
    count = 0
    for option, value in getattr(ns, "ordered", None) or []:
        try:
            if option == "qmp":
                count += 1
                cfg.actions.append(MonitorConfig(f"qmp{count}", parse_qmp_address(value)))
            elif option == "chardev":
                chardev_id, address = parse_chardev(value)
                if chardev_id in chardevs:
                    raise ConfigError(f"attempt to add duplicate chardev id '{chardev_id}'")
                chardevs[chardev_id] = address
            elif option == "monitor":
                opts = parse_option(value, implied_key="chardev")
                unknown = set(opts) - {"chardev", "mode", "pretty", "id"}
                if unknown:
                    raise ConfigError(f"Invalid parameter '{sorted(unknown)[0]}'")
                if "chardev" not in opts:
                    raise ConfigError("Parameter 'chardev' is missing")
                chardev_id = opts["chardev"]
                if chardev_id not in chardevs:
                    raise ConfigError(f"chardev \"{chardev_id}\" not found")
                if chardev_id in used_chardevs:
                    raise ConfigError(f"chardev '{chardev_id}' is already in use")
                if opts.get("mode", "control") != "control":
                    raise ConfigError("qmpd serves QMP only: mode must be 'control'")
                used_chardevs.add(chardev_id)
                cfg.actions.append(
                    MonitorConfig(
                        opts.get("id", chardev_id),
                        chardevs[chardev_id],
                        parse_bool(opts.get("pretty", False), "pretty"),
                    )
                )
            elif option == "http":
                cfg.actions.append(parse_http(value))
            elif option == "blockdev":
                cfg.actions.append(BlockdevConfig(value, parse_blockdev(value)))
            elif option == "nbd_server":
                cfg.actions.append(parse_nbd_server(value))
            elif option == "export":
                cfg.actions.append(parse_export(value))
        except ConfigError as exc:
            raise ConfigError(f"--{option.replace('_', '-')} {value}: {exc}") from None
    if not cfg.monitors and not cfg.http:
        cfg.actions.append(MonitorConfig("qmp0", UnixAddress(DEFAULT_QMP_SOCKET)))
        cfg.actions.append(parse_http(DEFAULT_HTTP))
        cfg.used_defaults = True
    return cfg


def parse_qmp_address(text: str) -> SocketAddress:
    """``unix:PATH`` or ``tcp:[HOST]:PORT``, with optional ``,server=on,wait=off``."""
    main, _, rest = text.partition(",")
    for flag in filter(None, rest.split(",")):
        if flag in ("server", "nowait", "server=on", "wait=off"):
            continue
        raise ConfigError(f"unsupported flag '{flag}' (qmpd always listens without waiting)")
    if main.startswith("unix:"):
        path = main[len("unix:"):]
        if not path:
            raise ConfigError("missing socket path")
        return UnixAddress(path)
    if main.startswith("tcp:"):
        return _inet(main[len("tcp:"):])
    raise ConfigError("expected unix:PATH or tcp:HOST:PORT")


def _inet(hostport: str) -> InetAddress:
    m = re.fullmatch(r"(?:\[([^\]]*)\]|([^:]*)):(\d+)", hostport)
    if m is None:
        raise ConfigError(f"expected HOST:PORT, got '{hostport}'")
    host = m.group(1) if m.group(1) is not None else m.group(2)
    port = int(m.group(3))
    if port > 65535:
        raise ConfigError(f"port {port} out of range")
    return InetAddress(host or LOOPBACK, port)


def parse_chardev(text: str) -> tuple[str, SocketAddress]:
    opts = parse_option(text, implied_key="backend")
    backend = opts.pop("backend", None)
    if backend != "socket":
        raise ConfigError("only 'socket' character devices are supported")
    chardev_id = opts.pop("id", None)
    if not chardev_id:
        raise ConfigError("Parameter 'id' is missing")
    server = parse_bool(opts.pop("server", "off"), "server")
    wait = parse_bool(opts.pop("wait", "on"), "wait")
    if not server:
        raise ConfigError("qmpd only listens: server=on is required")
    if wait:
        raise ConfigError("qmpd does not wait for a client before starting: use wait=off")
    path = opts.pop("path", None)
    host = opts.pop("host", None)
    port = opts.pop("port", None)
    if opts:
        raise ConfigError(f"Invalid parameter '{sorted(opts)[0]}'")
    if path is not None:
        if host is not None or port is not None:
            raise ConfigError("path and host/port are mutually exclusive")
        return chardev_id, UnixAddress(path)
    if port is None:
        raise ConfigError("chardev: socket: no host or path given")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"port '{port}' is not a number") from None
    return chardev_id, InetAddress(host or LOOPBACK, port_number)


def parse_blockdev(text: str) -> dict[str, Any]:
    """--blockdev in keyval or JSON form; keyval strings become typed values."""
    if text.lstrip().startswith("{"):
        return parse_option(text)
    return coerce_keyval(parse_option(text))


_BOOL_KEYS = frozenset({
    "read-only", "auto-read-only", "force-share", "direct", "no-flush", "drop-cache",
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
    "read-zeroes", "active", "x-check-cache-dropped",
})
_INT_KEYS = frozenset({
    "offset", "size", "cache-size", "l2-cache-size", "l2-cache-entry-size",
    "refcount-cache-size", "cache-clean-interval", "aio-max-batch", "latency-ns",
})


def coerce_keyval(value: dict[str, Any]) -> dict[str, Any]:
    """Give keyval strings the types blockdev-add expects (QEMU's keyval visitor)."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out[key] = coerce_keyval(item)
        elif key in _BOOL_KEYS:
            out[key] = parse_bool(item, key)
        elif key in _INT_KEYS:
            try:
                out[key] = int(item, 0)
            except ValueError:
                raise ConfigError(f"Parameter '{key}' expects a number") from None
        elif key == "backing" and item == "null":
            out[key] = None
        else:
            out[key] = item
    return out


def parse_http(text: str) -> HttpConfig:
    if re.fullmatch(r"\d+", text):
        return HttpConfig(LOOPBACK, int(text))
    address = _inet(text)
    return HttpConfig(address.host, address.port)
