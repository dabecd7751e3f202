"""Command line: qemu-storage-daemon's options, processed in order.

Options that create something (``--object``, ``--chardev``, ``--monitor``,
``--qmp``, ``--http``, ``--blockdev``, ``--nbd-server``, ``--export``) become
an ordered list of actions the daemon carries out one after the other at
start-up, so later options may refer to earlier ones.

Long options are matched exactly, as ``--NAME VALUE``, ``--NAME=VALUE`` or
QEMU's ``-NAME VALUE``; there are no abbreviations, so ``-mon`` is
``--monitor`` and never ``-m on``.  Errors are one line, as QSD's.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmpd import __version__
from qmpd.errors import ConfigError
from qmpd.keyval import parse_bool, parse_option
from qmpd.logs import LEVELS
from qmpd.nbd.config import ExportConfig, NbdServerConfig, parse_export, parse_nbd_server
from qmpd.net import InetAddress, SocketAddress, StdioAddress, UnixAddress, parse_host_port
from qmpd.qmp.budget import DEFAULT_QMP_INPUT_TOTAL
from qmpd.qmp.config import DEFAULT_OUTPUT_LIMIT, MonitorConfig

DEFAULT_QMP_SOCKET = "qmpd.sock"
DEFAULT_HTTP = "127.0.0.1:9180"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class HttpConfig:
    """Where the health and metrics endpoints listen, and how (HTTPS with ``tls_creds``)."""

    host: str
    port: int
    tls_creds: str | None = None
    tls_authz: str | None = None
    #: Plain HTTP on an address that is not loopback: only when asked for.
    insecure: bool = False
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class BlockdevConfig:
    """A node to create at start-up, as with blockdev-add."""

    text: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ObjectConfig:
    """A user-creatable object to add at start-up, as with object-add."""

    text: str
    options: dict[str, Any]


Action = (MonitorConfig | HttpConfig | BlockdevConfig | NbdServerConfig | ExportConfig
          | ObjectConfig)


class Exit(Exception):
    """``--help`` or ``--version``: print ``text`` on stdout and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass
class Config:
    """Everything the command line asked for."""

    actions: list[Action] = field(default_factory=list)
    paused: bool = False
    incoming: str | None = None
    name: str | None = None
    pidfile: str | None = None
    daemonize: bool = False
    log_level: str = "warning"
    log_file: str | None = None
    qemu_version: tuple[int, int, int] = (7, 2, 0)
    package: str = f"qmpd {__version__}"
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    qmp_input_total: int = DEFAULT_QMP_INPUT_TOTAL
    event_loop: str = "asyncio"
    tls_handshake_timeout: float = 10.0
    used_defaults: bool = False
    ignored: list[str] = field(default_factory=list)

    @property
    def monitors(self) -> list[MonitorConfig]:
        return [a for a in self.actions if isinstance(a, MonitorConfig)]

    @property
    def http(self) -> list[HttpConfig]:
        return [a for a in self.actions if isinstance(a, HttpConfig)]

    def version_info(self) -> dict[str, Any]:
        major, minor, micro = self.qemu_version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.package}


@dataclass(frozen=True)
class Option:
    """One command-line option: its long name, short letter and argument."""

    name: str
    metavar: str | None  # None: a flag without an argument
    help: str
    short: str | None = None
    aliases: tuple[str, ...] = ()


OPTIONS = (
    Option("help", None, "display this help and exit", "h"),
    Option("version", None, "output version information and exit", "V"),
    Option("trace", "PATTERN", "accepted for compatibility; qmpd has no trace events", "T"),
    Option("object", "TYPE,id=ID[,PROP=VALUE...]",
           "an object (secret, iothread, throttle-group), as object-add"),
    Option("blockdev", "[driver=]DRIVER,node-name=N[,...]",
           "a block node, as blockdev-add (keyval or JSON)"),
    Option("chardev", "socket,id=ID,path=P|host=H,port=N[,server=on[,wait=off]]"
           "[,tls-creds=ID[,tls-authz=ID]] | stdio,id=ID",
           "a character device for --monitor (a socket listening or connecting, or stdio)"),
    Option("monitor", "[chardev=]ID[,mode=control][,pretty=on|off]",
           "a QMP monitor on a --chardev", aliases=("mon",)),
    Option("qmp", "unix:PATH|tcp:HOST:PORT[,server=on][,wait=off][,tls-creds=ID[,tls-authz=ID]]",
           "a QMP monitor listening at this address (QEMU's -qmp); TLS on TCP"),
    Option("tls-handshake-timeout", "SECONDS",
           "drop a client that has not finished its TLS handshake by then (default 10)"),
    Option("nbd-server", "addr.type=unix,addr.path=PATH|addr.type=inet,...",
           "start the NBD server, as nbd-server-start"),
    Option("export", "[type=]nbd,id=ID,node-name=NODE[,...]",
           "export a node, as block-export-add"),
    Option("http", "[HOST:]PORT[,tls-creds=ID[,tls-authz=ID]][,insecure=on]",
           "serve /health, /ready and /metrics here (loopback by default; HTTPS with "
           "tls-creds; plain HTTP off loopback only with insecure=on)"),
    Option("pidfile", "PATH", "write the process ID here once started (locked)"),
    Option("daemonize", None, "detach once started; the parent exits 0 when the daemon is ready"),
    Option("paused", None, "start in prelaunch instead of running (QEMU's -S)", "S"),
    Option("incoming", "defer|URI", "wait for an incoming migration (run state inmigrate)"),
    Option("name", "NAME", "the name query-name reports"),
    Option("memory", "SIZE", "accepted for compatibility with QEMU; ignored", "m"),
    Option("log-level", "|".join(LEVELS),
           "what to log (default: warning: quiet while all is well)"),
    Option("log-file", "PATH", "log to this file instead of stderr (QEMU's -D)", "D"),
    Option("qmp-version", "MAJOR.MINOR.MICRO", "the QEMU version reported (default 7.2.0)"),
    Option("qmp-package", "TEXT", "the package string reported next to the version"),
    Option("event-loop", "asyncio|uvloop|auto", "the event loop (default asyncio)"),
    Option("max-client-output", "BYTES",
           "output queued for one QMP client before it is disconnected"),
    Option("max-qmp-input-total", "BYTES",
           "unfinished QMP input held across all clients (default 256 MiB)"),
)

_LONG = {o.name: o for o in OPTIONS} | {a: o for o in OPTIONS for a in o.aliases}
_SHORT = {o.short: o for o in OPTIONS if o.short}
_ORDERED = frozenset({"object", "blockdev", "chardev", "monitor", "qmp", "nbd-server",
                      "export", "http"})


def usage() -> str:
    lines = ["Usage: qmpd [options]", "A QMP-speaking block-device daemon, like "
             "qemu-storage-daemon 7.2.", ""]
    for o in OPTIONS:
        names = (f"-{o.short}, " if o.short else "    ") + f"--{o.name}"
        if o.metavar:
            names += f" {o.metavar}"
        lines.append(f"  {names}")
        lines.append(f"        {o.help}")
    lines += ["", "Long options may also be written with one dash (-blockdev, -mon) as QEMU",
              "accepts them. With no options at all, qmpd listens on "
              f"unix:./{DEFAULT_QMP_SOCKET} and serves HTTP on {DEFAULT_HTTP}."]
    return "\n".join(lines) + "\n"


def scan(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """argv as (option name, value) pairs in order, with getopt's one-line errors."""
    out: list[tuple[str, str | None]] = []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        value: str | None = None
        if arg.startswith("--") and len(arg) > 2:
            name, eq, inline = arg[2:].partition("=")
            opt = _LONG.get(name)
            if opt is None:
                raise ConfigError(f"unrecognized option '--{name}'")
            if eq:
                if opt.metavar is None:
                    raise ConfigError(f"option '--{opt.name}' doesn't allow an argument")
                value = inline
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            body = arg[1:]
            opt = _LONG.get(body) if len(body) > 1 else _SHORT.get(body)
            if opt is None:
                if len(body) > 1 and body[0] in _SHORT:
                    raise ConfigError(f"unrecognized option '{arg}'")
                raise ConfigError(f"invalid option -- '{body[0]}'")
            name = body
        else:
            raise ConfigError(f"unexpected argument '{arg}'")
        if opt.metavar is not None and value is None:
            if i >= len(args):
                if arg.startswith("--") or len(arg) > 2:
                    raise ConfigError(f"option '{arg}' requires an argument")
                raise ConfigError(f"option requires an argument -- '{arg[1]}'")
            value = args[i]
            i += 1
        out.append((opt.name, value))
    return out


def parse_args(argv: Sequence[str]) -> Config:
    """Turn argv into a Config; ConfigError is one line naming the option."""
    items = scan(argv)
    cfg = Config()
    names = {name for name, _ in items}
    if "help" in names:
        raise Exit(usage())
    if "version" in names:
        major, minor, micro = cfg.qemu_version
        raise Exit(f"qmpd version {__version__} (QMP of QEMU {major}.{minor}.{micro}, "
                   "command line of qemu-storage-daemon)\n")
    # qmp0, qmp1, ... for monitors the user did not name, in command-line order.
    monitor_ids = (f"qmp{n}" for n in itertools.count())
    chardevs: dict[str, MonitorConfig] = {}
    used_chardevs: set[str] = set()
    for name, value in items:
        text = value or ""
        try:
            if name in _ORDERED:
                _ordered(cfg, name, text, chardevs, used_chardevs, monitor_ids)
            else:
                _scalar(cfg, name, text)
        except ConfigError as exc:
            message = str(exc)
            if name == "object":  # a secret's data is never shown
                text, message = redact(text), redact_message(text, message)
            shown = f"--{name} {text}" if value is not None else f"--{name}"
            raise ConfigError(f"{shown}: {message}") from None
    if not argv:
        cfg.actions.append(MonitorConfig(next(monitor_ids), UnixAddress(DEFAULT_QMP_SOCKET)))
        cfg.actions.append(parse_http(DEFAULT_HTTP))
        cfg.used_defaults = True
    return cfg


def _scalar(cfg: Config, name: str, value: str) -> None:
    if name == "trace":
        cfg.ignored.append(f"--trace {value}: qmpd has no trace events; ignored")
    elif name == "pidfile":
        cfg.pidfile = value
    elif name == "daemonize":
        cfg.daemonize = True
    elif name == "paused":
        cfg.paused = True
    elif name == "incoming":
        cfg.incoming = value
    elif name == "name":
        cfg.name = value
    elif name == "memory":
        pass
    elif name == "log-level":
        if value not in LEVELS:
            raise ConfigError(f"expected one of {', '.join(LEVELS)}")
        cfg.log_level = value
    elif name == "log-file":
        cfg.log_file = value
    elif name == "qmp-version":
        m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", value)
        if m is None:
            raise ConfigError("expected MAJOR.MINOR.MICRO")
        cfg.qemu_version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    elif name == "qmp-package":
        cfg.package = value
    elif name == "event-loop":
        if value not in ("asyncio", "uvloop", "auto"):
            raise ConfigError("expected asyncio, uvloop or auto")
        cfg.event_loop = value
    elif name == "max-client-output":
        try:
            cfg.output_limit = int(value)
        except ValueError:
            raise ConfigError("expected a number of bytes") from None
    elif name == "tls-handshake-timeout":
        try:
            cfg.tls_handshake_timeout = float(value)
        except ValueError:
            raise ConfigError("expected a number of seconds") from None
        if not cfg.tls_handshake_timeout > 0:
            raise ConfigError("expected a number of seconds")
    elif name == "max-qmp-input-total":
        try:
            cfg.qmp_input_total = int(value)
        except ValueError:
            raise ConfigError("expected a number of bytes") from None
        if cfg.qmp_input_total < 0:
            raise ConfigError("expected a number of bytes")


def _ordered(cfg: Config, name: str, value: str, chardevs: dict[str, MonitorConfig],
             used_chardevs: set[str], monitor_ids: Iterator[str]) -> None:
    if name == "object":
        cfg.actions.append(ObjectConfig(value, parse_option(value, implied_key="qom-type")))
    elif name == "qmp":
        address, server, wait, tls = parse_qmp_address(value)
        cfg.actions.append(MonitorConfig(next(monitor_ids), address, client=not server,
                                         wait=wait, origin=f"--qmp {value}",
                                         tls_creds=tls[0], tls_authz=tls[1]))
    elif name == "chardev":
        chardev = parse_chardev(value)
        if chardev.id in chardevs:
            raise ConfigError(f"attempt to add duplicate chardev id '{chardev.id}'")
        chardevs[chardev.id] = chardev
    elif name == "monitor":
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
            raise ConfigError(f"Device '{chardev_id}' is in use")
        if opts.get("mode", "control") != "control":
            raise ConfigError("Only QMP is supported")
        used_chardevs.add(chardev_id)
        base = chardevs[chardev_id]
        cfg.actions.append(MonitorConfig(
            opts.get("id", chardev_id), base.address,
            parse_bool(opts.get("pretty", False), "pretty"),
            client=base.client, wait=base.wait, origin=base.origin,
            tls_creds=base.tls_creds, tls_authz=base.tls_authz,
        ))
    elif name == "http":
        cfg.actions.append(parse_http(value))
    elif name == "blockdev":
        cfg.actions.append(BlockdevConfig(value, parse_blockdev(value)))
    elif name == "nbd-server":
        cfg.actions.append(parse_nbd_server(value))
    elif name == "export":
        cfg.actions.append(parse_export(value))


REDACTED = "<redacted>"
_JSON_DATA = re.compile(r'("data"\s*:\s*)"((?:[^"\\]|\\.)*)"')


def _raw_elements(text: str) -> list[str]:
    """keyval's elements as written (``,,`` kept), split at single commas."""
    out, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current += ",,"
                i += 2
                continue
            out.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    out.append(current)
    return out


def _keyval_secrets(text: str) -> tuple[list[str], list[str]]:
    """(elements with ``data`` values replaced, the values as written).

    A value with an unescaped comma (``data=a,b``) goes on into the elements
    without ``=`` that follow it: the parser would take ``b`` for a key.
    """
    shown: list[str] = []
    secrets: list[str] = []
    in_data = False
    for element in _raw_elements(text):
        if element.startswith("data="):
            in_data = True
            secrets.append(element[len("data="):])
            shown.append("data=" + REDACTED)
        elif in_data and "=" not in element:
            secrets[-1] += "," + element
        else:
            in_data = False
            shown.append(element)
    return shown, secrets


def redact(text: str) -> str:
    """An --object's text fit to show: a secret's ``data`` value replaced (QSD shows it)."""
    if text.lstrip().startswith("{"):
        return _JSON_DATA.sub(lambda m: f'{m.group(1)}"{REDACTED}"', text)
    return ",".join(_keyval_secrets(text)[0])


def redact_message(text: str, message: str) -> str:
    """An error about ``text`` without its ``data`` value or any piece of it."""
    message = message.replace(text, redact(text))
    if text.lstrip().startswith("{"):
        values = [m.group(2) for m in _JSON_DATA.finditer(text)]
    else:
        values = _keyval_secrets(text)[1]
    pieces: set[str] = set()
    for value in values:
        pieces.update((value, value.replace(",,", ",")))
        pieces.update(value.replace(",,", ",").split(","))
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= 3:  # shorter pieces would mask ordinary words
            message = message.replace(piece, REDACTED)
    return message


TlsOptions = tuple[str | None, str | None]


def _tls_options(opts: dict[str, Any], address: SocketAddress) -> TlsOptions:
    """(``tls-creds``, ``tls-authz``) taken out of ``opts``, with QEMU's chardev texts."""
    creds = opts.pop("tls-creds", None)
    authz = opts.pop("tls-authz", None)
    if creds is not None and not isinstance(address, InetAddress):
        raise ConfigError("'tls_creds' option is incompatible with 'unix' address type")
    if authz is not None and creds is None:
        raise ConfigError("'tls_authz' option requires 'tls_creds' option")
    return creds, authz


def parse_qmp_address(text: str) -> tuple[SocketAddress, bool, bool, TlsOptions]:
    """``unix:PATH`` or ``tcp:[HOST]:PORT`` with QEMU's ``,server=on,wait=off`` flags.

    Returns (address, server, wait, TLS options).  Without flags qmpd listens and does not
    wait (QEMU's -qmp needs ``server=on,wait=off`` for that; qmpd keeps its
    long-standing default).
    """
    main, _, rest = text.partition(",")
    flags: dict[str, str] = {}
    for flag in filter(None, rest.split(",")):
        key, eq, value = flag.partition("=")
        if not eq:  # QEMU's old spellings: server, nowait
            key, value = {"server": ("server", "on"), "nowait": ("wait", "off")}.get(
                flag, (flag, ""))
        if key not in ("server", "wait", "tls-creds", "tls-authz"):
            raise ConfigError(f"Invalid parameter '{key}'")
        flags[key] = value
    tls: dict[str, Any] = {k: flags.pop(k) for k in ("tls-creds", "tls-authz") if k in flags}
    # No flags at all: listen without waiting (qmpd's --qmp has always meant
    # that); with flags, QEMU's defaults (server=off, wait=on) apply.
    default_server, default_wait = ("on", "off") if not flags else ("off", "on")
    if not flags and tls:
        default_server, default_wait = "on", "off"
    server = parse_bool(flags.get("server", default_server), "server")
    wait = server and parse_bool(flags.get("wait", default_wait), "wait")
    address: SocketAddress
    if main.startswith("unix:"):
        path = main[len("unix:"):]
        if not path:
            raise ConfigError("missing socket path")
        address = UnixAddress(path)
    elif main.startswith("tcp:"):
        address = parse_host_port(main[len("tcp:"):], LOOPBACK)
    else:
        raise ConfigError("expected unix:PATH or tcp:HOST:PORT")
    return address, server, wait, _tls_options(tls, address)


def parse_chardev(text: str) -> MonitorConfig:
    """``socket,id=ID,path=P|host=H,port=N[,server=on|off][,wait=on|off]`` or ``stdio,id=ID``.

    Returned as the monitor it would become; --monitor supplies the id and pretty.
    """
    opts = parse_option(text, implied_key="backend")
    backend = opts.pop("backend", None)
    chardev_id = opts.pop("id", None)
    if not chardev_id:
        raise ConfigError("Parameter 'id' is missing")
    origin = f"--chardev {text}"
    if backend == "stdio":
        opts.pop("signal", None)
        if opts:
            raise ConfigError(f"Invalid parameter '{sorted(opts)[0]}'")
        return MonitorConfig(chardev_id, StdioAddress(), origin=origin)
    if backend != "socket":
        raise ConfigError(f"'{backend}' character devices are not supported "
                          "(qmpd has 'socket' and 'stdio')")
    server = parse_bool(opts.pop("server", "off"), "server")
    wait = parse_bool(opts.pop("wait", "on"), "wait")
    for ignored in ("nodelay", "ipv4", "ipv6"):
        opts.pop(ignored, None)
    path = opts.pop("path", None)
    host = opts.pop("host", None)
    port = opts.pop("port", None)
    tls: dict[str, Any] = {k: opts.pop(k) for k in ("tls-creds", "tls-authz") if k in opts}
    if opts:
        raise ConfigError(f"Invalid parameter '{sorted(opts)[0]}'")
    address: SocketAddress
    if path is not None:
        if host is not None or port is not None:
            raise ConfigError("path and host/port are mutually exclusive")
        address = UnixAddress(path)
    elif port is None:
        raise ConfigError("chardev: socket: no host or path given")
    else:
        try:
            port_number = int(port)
        except ValueError:
            raise ConfigError(f"port '{port}' is not a number") from None
        address = InetAddress(host or LOOPBACK, str(port_number))
    creds, authz = _tls_options(tls, address)
    return MonitorConfig(chardev_id, address, client=not server, wait=server and wait,
                         origin=origin, tls_creds=creds, tls_authz=authz)


def parse_blockdev(text: str) -> dict[str, Any]:
    """--blockdev in keyval or JSON form; keyval strings become typed values."""
    if text.lstrip().startswith("{"):
        return parse_option(text)
    return coerce_keyval(parse_option(text, implied_key="driver"))


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
    """``[HOST:]PORT`` then optional ``,tls-creds=ID,tls-authz=ID,insecure=on``."""
    main, _, rest = text.partition(",")
    opts = parse_option(rest) if rest else {}
    unknown = set(opts) - {"tls-creds", "tls-authz", "insecure"}
    if unknown:
        raise ConfigError(f"Invalid parameter '{sorted(unknown)[0]}'")
    creds = opts.get("tls-creds")
    authz = opts.get("tls-authz")
    if authz is not None and creds is None:
        raise ConfigError("'tls-authz' requires 'tls-creds'")
    insecure = parse_bool(opts.get("insecure", False), "insecure")
    if re.fullmatch(r"\d+", main):
        host, port = LOOPBACK, int(main)
    else:
        address = parse_host_port(main, LOOPBACK)
        host, port = address.host, int(address.port)
    return HttpConfig(host, port, creds, authz, insecure, origin=f"--http {text}")
