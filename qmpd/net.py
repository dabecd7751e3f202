"""Sockets in one place: addresses, listening, connecting, and UNIX socket files.

Addresses come from QAPI ``SocketAddress`` dicts (:func:`parse_socket_address`),
migration URIs (:func:`parse_migration_uri`) and the command line
(:func:`parse_host_port`).  :func:`listen` and :func:`connect` serve QMP
monitors, the NBD server and migration alike, with QEMU's error texts.

Rules for UNIX socket files:

- the file at the path appears only once the socket listens: it is bound under
  a temporary name in the same directory and hard-linked into place, so a
  client that connects as soon as the file exists is never refused;
- a path where another process is listening is never taken over: binding
  fails with EADDRINUSE ("Address already in use");
- only a dead socket file (nobody listening) is removed before binding; any
  other file stays, and binding fails with EADDRINUSE (QEMU 7.2 unlinks it);
- at exit the file is removed only if it is still the one we bound.

TLS: :func:`tls_accept` and :func:`tls_connect` put a connected socket under
TLS (an ``ssl.SSLContext`` from a ``tls-creds-x509`` object) before its
protocol sees a byte; a handshake that fails or outlasts its timeout raises
:class:`TlsFailed`, whose text says why in GnuTLS's words where it has them.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from qmpd.errors import ConfigError, GenericError

log = logging.getLogger(__name__)

#: sun_path's size on Linux, terminating NUL included.
UNIX_PATH_MAX = 108

_names = itertools.count()


# --- addresses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UnixAddress:
    """UnixSocketAddress."""

    path: str
    abstract: bool = False
    tight: bool = True

    def __str__(self) -> str:
        return f"unix:{'@' if self.abstract else ''}{self.path}"


@dataclass(frozen=True)
class InetAddress:
    """InetSocketAddress; the port is a string, as in QAPI (a service name will do)."""

    host: str
    port: str
    numeric: bool = False
    to: int | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    keep_alive: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class VsockAddress:
    """VsockSocketAddress."""

    cid: str
    port: str

    def __str__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"


@dataclass(frozen=True)
class FdAddress:
    """A file descriptor passed with getfd, by name (QAPI's ``String``)."""

    name: str

    def __str__(self) -> str:
        return f"fd:{self.name}"


SocketAddress = UnixAddress | InetAddress | VsockAddress | FdAddress


@dataclass(frozen=True)
class StdioAddress:
    """The process's stdin and stdout (``--chardev stdio``)."""

    def __str__(self) -> str:
        return "stdio"


#: The members of each address type in the flat (QEMU 8+/--nbd-server) form.
FLAT_MEMBERS: dict[str, tuple[str, ...]] = {
    "inet": ("host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"),
    "unix": ("path", "abstract", "tight"),
    "vsock": ("cid", "port"),
    "fd": ("str",),
}


def parse_socket_address(addr: dict[str, Any]) -> SocketAddress:
    """A schema-validated SocketAddress, flat or legacy (``"data": {...}``) form."""
    kind = addr["type"]
    if "data" in addr:
        for member in FLAT_MEMBERS[kind]:
            if member in addr:
                raise GenericError(f"Parameter 'addr.{member}' is unexpected")
        data: dict[str, Any] = addr["data"]
    else:
        data = addr
    if kind == "unix":
        return UnixAddress(data["path"], data.get("abstract", False), data.get("tight", True))
    if kind == "inet":
        return InetAddress(
            data["host"], data["port"], data.get("numeric", False), data.get("to"),
            data.get("ipv4"), data.get("ipv6"), data.get("keep-alive", False),
        )
    if kind == "vsock":
        return VsockAddress(data["cid"], data["port"])
    return FdAddress(data["str"])


def parse_host_port(text: str, default_host: str) -> InetAddress:
    """The command line's ``HOST:PORT`` or ``[IPV6]:PORT``; an empty host is ``default_host``."""
    m = re.fullmatch(r"(?:\[([^\]]*)\]|([^:]*)):(\d+)", text)
    if m is None:
        raise ConfigError(f"expected HOST:PORT, got '{text}'")
    host = m.group(1) if m.group(1) is not None else m.group(2)
    port = int(m.group(3))
    if port > 65535:
        raise ConfigError(f"port {port} out of range")
    return InetAddress(host or default_host, str(port))


@dataclass(frozen=True)
class MigrationURI:
    scheme: str  # tcp, unix, exec, fd
    target: str  # path, "host:port", command or fd name
    host: str = ""  # tcp: as given, without [] around an IPv6 address
    port: int = 0  # tcp: the port when numeric (else 0: resolved at connect time)
    service: str = ""  # tcp: the port as given

    @property
    def address(self) -> SocketAddress | None:
        """The socket address of a tcp:, unix: or fd: URI (exec: has none)."""
        if self.scheme == "tcp":
            return InetAddress(self.host, self.service)
        if self.scheme == "unix":
            return UnixAddress(self.target)
        if self.scheme == "fd":
            return FdAddress(self.target)
        return None


_BAD_PROTOCOL = "Parameter 'uri' expects a valid migration protocol"


def parse_migration_uri(uri: str) -> MigrationURI:
    """Split a migration URI; errors carry QEMU 7.2's texts."""
    for scheme in ("tcp", "unix", "exec", "fd"):
        prefix = scheme + ":"
        if uri.startswith(prefix):
            rest = uri[len(prefix):]
            if scheme == "tcp":
                if rest.startswith("["):
                    close = rest.find("]")
                    host, sep, service = rest[1:close], ":", rest[close + 2:]
                    if close < 0 or rest[close + 1:close + 2] != ":":
                        raise GenericError(f"error parsing address '{rest}'")
                else:
                    host, sep, service = rest.rpartition(":")
                if not sep:
                    raise GenericError(f"error parsing address '{rest}'")
                port = int(service) if service.isdigit() else 0
                return MigrationURI(scheme, rest, host, port, service)
            if scheme == "unix" and not rest:
                raise GenericError("invalid Unix socket address")
            return MigrationURI(scheme, rest)
    raise GenericError(_BAD_PROTOCOL)


def is_bad_protocol(exc: GenericError) -> bool:
    """The one URI error after which QEMU records no error-desc."""
    return exc.desc == _BAD_PROTOCOL


# --- UNIX socket files --------------------------------------------------------------------


@dataclass(slots=True)
class UnixListener:
    """A bound, listening UNIX socket and the file it owns."""

    sock: socket.socket
    path: str
    inode: int

    def unlink(self) -> None:
        """Remove the socket file, unless someone else's now sits at the path."""
        _unlink_if_same(self.path, self.inode)


def is_listening(path: str) -> bool:
    """Whether a process accepts connections on the UNIX socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except BlockingIOError:
        return True  # a full backlog: alive, only busy
    except OSError:
        return False
    finally:
        probe.close()
    return True


def remove_stale(path: str) -> None:
    """Unlink a dead socket file at ``path``; refuse a live one; leave other files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        return  # bind() fails with EADDRINUSE, as it should
    if is_listening(path):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind_unix_file(path: str, backlog: int = 128, mode: int | None = 0o600) -> UnixListener:
    """Listen on ``path``; the file appears only once the socket accepts connections.

    ``mode`` None leaves the file as bind() makes it (0777 less the umask).
    """
    remove_stale(path)
    directory, base = os.path.split(path)
    temp = os.path.join(directory, f".{base}.{os.getpid()}.{next(_names)}")
    if len(os.fsencode(temp)) >= UNIX_PATH_MAX:
        temp = os.path.join(directory, f".q{os.getpid()}.{next(_names)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the socket inode's mode set before bind() is the file's,
        # so it is never reachable by others, even for an instant.
        if mode is not None:
            os.fchmod(sock.fileno(), mode)
        if len(os.fsencode(temp)) >= UNIX_PATH_MAX:
            sock.bind(path)  # no room for a temporary name: bind in place
            if mode is not None:
                os.chmod(path, mode)
            sock.listen(backlog)
        else:
            sock.bind(temp)
            try:
                if mode is not None:
                    os.chmod(temp, mode)
                sock.listen(backlog)
                try:
                    os.link(temp, path)
                except FileExistsError:
                    # Someone bound the path since we looked: theirs if alive.
                    remove_stale(path)
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE),
                                      path) from None
            finally:
                os.unlink(temp)
        inode = os.stat(path).st_ino
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return UnixListener(sock, path, inode)


def _unlink_if_same(path: str, inode: int) -> None:
    """Remove ``path`` only if it is still the socket file with ``inode``."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class ListenFailed(OSError):
    """Listening failed: errno and strerror are the cause's, str() is QEMU's text."""

    def __init__(self, code: int, strerror: str, desc: str) -> None:
        super().__init__(code, strerror)
        self.desc = desc

    def __str__(self) -> str:
        return self.desc


@dataclass(slots=True)
class Listener:
    """Listening, non-blocking sockets for one address, and the socket file they own."""

    socks: list[socket.socket]
    #: Where it listens: a port 0 resolved (the host as given).
    address: SocketAddress
    unix: UnixListener | None = None

    @property
    def sock(self) -> socket.socket:
        return self.socks[0]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        if self.unix is not None:
            self.unix.unlink()
            self.unix = None


def listen(address: SocketAddress, *, mode: int | None = None, every_address: bool = False,
           backlog: int = 128) -> Listener:
    """Listen at ``address``; :class:`ListenFailed` carries QEMU's text.

    A UNIX path follows the socket-file rules above; ``mode`` None leaves its
    file as bind() makes it.  ``every_address`` listens on each address
    ``host`` resolves to (migration's listener) instead of the first that binds.
    """
    if isinstance(address, UnixAddress):
        return _listen_unix(address, mode, backlog)
    if isinstance(address, InetAddress):
        if every_address:
            socks = _listen_inet_all(address, backlog)
        else:
            socks = [_listen_inet(address, backlog)]
        port = str(socks[0].getsockname()[1])
        return Listener(socks, InetAddress(address.host, port))
    if isinstance(address, VsockAddress):
        return Listener([_listen_vsock(address, backlog)], address)
    raise ListenFailed(errno.EINVAL, os.strerror(errno.EINVAL),
                       "only QEMU supports file descriptor passing")


def _listen_unix(address: UnixAddress, mode: int | None, backlog: int) -> Listener:
    path = address.path
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        raise ListenFailed(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG),
                           f"UNIX socket path '{path}' is too long")
    try:
        if not address.abstract:
            unix = _bind_unix_file(path, backlog, mode)
            return Listener([unix.sock], address, unix)
        name = b"\0" + os.fsencode(path)
        if not address.tight:
            name = name.ljust(UNIX_PATH_MAX, b"\0")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return Listener([sock], address)
    except OSError as exc:
        raise ListenFailed(exc.errno or errno.EINVAL, exc.strerror or str(exc),
                           f"Failed to bind socket to {path}: {exc.strerror}") from None


def _resolve(address: InetAddress, flags: int) -> list[tuple[Any, ...]]:
    family = socket.AF_UNSPEC
    if address.ipv4 and not address.ipv6:
        family = socket.AF_INET
    elif address.ipv6 and not address.ipv4:
        family = socket.AF_INET6
    if address.numeric:
        flags |= socket.AI_NUMERICHOST
    try:
        return list(socket.getaddrinfo(address.host or None, address.port, family,
                                       socket.SOCK_STREAM, 0, flags))
    except socket.gaierror as exc:
        raise ListenFailed(
            exc.errno or errno.EINVAL, exc.strerror or str(exc),
            f"address resolution failed for {address.host}:{address.port}: {exc.strerror}",
        ) from None


def _bind_failed(exc: OSError) -> ListenFailed:
    code = exc.errno or errno.EINVAL
    if code == errno.EADDRINUSE:
        desc = f"Failed to find an available port: {exc.strerror}"
    else:
        desc = f"Failed to bind socket: {exc.strerror}"
    return ListenFailed(code, exc.strerror or os.strerror(code), desc)


def _listen_inet(address: InetAddress, backlog: int) -> socket.socket:
    """The first address that binds (SO_REUSEADDR, as QEMU sets it)."""
    last: OSError | None = None
    for family, kind, proto, _canon, target in _resolve(address, socket.AI_PASSIVE):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address.ipv4 is not False and address.ipv6 is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(target)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise _bind_failed(exc) from None
            last = exc
            continue
        sock.setblocking(False)
        return sock
    if last is not None and last.errno == errno.EADDRINUSE:
        raise _bind_failed(last)
    code = last.errno if last is not None and last.errno else errno.EADDRNOTAVAIL
    strerror = last.strerror if last is not None else "no address"
    raise ListenFailed(code, strerror or os.strerror(code),
                       f"Failed to create a socket: {strerror}")


def _listen_inet_all(address: InetAddress, backlog: int) -> list[socket.socket]:
    """Every address ``host`` resolves to, each IPv6 one IPv6-only; all or nothing."""
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _canon, target in dict.fromkeys(
                _resolve(address, socket.AI_PASSIVE)):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # an address family the host lacks
            socks.append(sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(target)
                sock.listen(backlog)
            except OSError as exc:
                raise _bind_failed(exc) from None
            sock.setblocking(False)
        if not socks:
            raise ListenFailed(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL),
                               "Failed to create a socket: no address")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _listen_vsock(address: VsockAddress, backlog: int) -> socket.socket:
    try:
        cid, port = int(address.cid), int(address.port)
    except ValueError:
        raise ListenFailed(errno.EINVAL, os.strerror(errno.EINVAL),
                           f"Invalid CID '{address.cid}' or port '{address.port}'") from None
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        code = exc.errno or errno.EAFNOSUPPORT
        raise ListenFailed(code, exc.strerror or os.strerror(code),
                           f"Failed to create socket: {exc.strerror}") from None
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        code = exc.errno or errno.EINVAL
        raise ListenFailed(code, exc.strerror or os.strerror(code),
                           f"Failed to bind socket: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class ConnectFailed(OSError):
    """Connecting to a peer failed; strerror and str() are QEMU's text."""

    def __str__(self) -> str:
        return self.strerror or ""


async def connect(address: SocketAddress) -> socket.socket:
    """A connected, non-blocking socket to ``address`` (QEMU's texts on failure)."""
    loop = asyncio.get_running_loop()
    if isinstance(address, UnixAddress):
        where = address.path
        if len(os.fsencode(where)) >= UNIX_PATH_MAX:
            raise ConnectFailed(errno.ENAMETOOLONG,
                                f"UNIX socket path '{where}' is too long")
        name: str | bytes = where
        if address.abstract:
            name = b"\0" + os.fsencode(where)
            if not address.tight:
                name = name.ljust(UNIX_PATH_MAX, b"\0")
        families: list[tuple[int, Any]] = [(socket.AF_UNIX, name)]
    elif isinstance(address, InetAddress):
        where = f"{address.host}:{address.port}"
        try:
            infos = await loop.getaddrinfo(address.host or None, address.port,
                                           type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectFailed(errno.EHOSTUNREACH,
                                f"address resolution failed for {where}: {exc.strerror}"
                                ) from None
        families = [(info[0], info[4]) for info in infos]
    elif isinstance(address, VsockAddress):
        where = f"{address.cid}:{address.port}"
        try:
            families = [(socket.AF_VSOCK, (int(address.cid), int(address.port)))]
        except ValueError:
            raise ConnectFailed(errno.EINVAL, f"Invalid CID '{address.cid}' or port "
                                f"'{address.port}'") from None
    else:
        raise ConnectFailed(errno.EINVAL, "only QEMU supports file descriptor passing")
    last: OSError | None = None
    for family, target in families:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    code = last.errno if last is not None and last.errno else errno.ECONNREFUSED
    raise ConnectFailed(code, f"Failed to connect to '{where}': {os.strerror(code)}")


# --- TLS ------------------------------------------------------------------------------------

#: OpenSSL verification codes in GnuTLS's words (as QEMU reports them).
_VERIFY_REASONS = {
    2: "The certificate hasn't got a known issuer",
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}


class TlsFailed(OSError):
    """A TLS handshake failed or timed out; str() says why, never with key material."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNABORTED, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def accept(listen_sock: socket.socket) -> tuple[socket.socket, Any]:
    """``loop.sock_accept`` without its race: (non-blocking socket, peer address).

    Python 3.11's sock_accept calls accept() in the reader callback itself.
    When the listener is readable and, in the same turn of the loop, the
    accept is cancelled and the socket closed (nbd-server-stop, a migration
    cancelled), that callback still runs: accept() fails (or takes a
    connection nobody will see) and setting the cancelled future's outcome
    raises InvalidStateError on the loop.  Here the callback only wakes the
    waiting coroutine, which accepts if it was not cancelled.
    """
    loop = asyncio.get_running_loop()
    fd = listen_sock.fileno()
    while True:
        try:
            conn, peer = listen_sock.accept()
        except (BlockingIOError, InterruptedError):
            pass
        else:
            conn.setblocking(False)
            return conn, peer
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(fd)


async def accept_each(listen_sock: socket.socket, running: Callable[[], bool],
                      label: str) -> AsyncIterator[tuple[socket.socket, Any]]:
    """(socket, peer address) of each connection accepted while ``running()``.
    A failed accept (EMFILE and friends) is logged and waited out, not spun on."""
    while running():
        try:
            sock, peer = await accept(listen_sock)
        except OSError as exc:
            log.warning("%s: accept failed: %s", label, exc.strerror)
            await asyncio.sleep(0.1)
            continue
        yield sock, peer


def tls_reason(exc: BaseException) -> str:
    """Why a handshake failed, in words fit for a log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, exc.verify_message or "certificate refused")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD",
                      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return "the peer does not speak TLS"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "No certificate was found."
        if "UNKNOWN_CA" in reason:
            return "the peer does not trust our certificate's issuer"
        if "CERTIFICATE_EXPIRED" in reason:
            return "the peer finds our certificate expired"
        if reason:
            return reason.replace("_", " ").lower()
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)) and "longer" in str(exc):
        return "the TLS handshake took too long"
    if isinstance(exc, TimeoutError):
        return "the TLS handshake took too long"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "the peer closed the connection during the TLS handshake"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


async def tls_accept(sock: socket.socket, context: ssl.SSLContext, factory: ProtocolFactory,
                     timeout: float) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """The server side of a TLS handshake on an accepted socket, then its protocol.

    The protocol's ``connection_made`` runs only once the handshake succeeded.
    On failure the socket is closed and :class:`TlsFailed` raised.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        return await asyncio.wait_for(
            loop.connect_accepted_socket(factory, sock, ssl=context,
                                         ssl_handshake_timeout=timeout),
            timeout + 1.0)
    except (OSError, EOFError, TimeoutError) as exc:
        sock.close()
        raise TlsFailed(tls_reason(exc)) from None


async def tls_connect(sock: socket.socket, context: ssl.SSLContext, factory: ProtocolFactory,
                      server_hostname: str | None, timeout: float
                      ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """The client side of a TLS handshake on a connected socket, then its protocol."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        return await asyncio.wait_for(
            loop.create_connection(factory, sock=sock, ssl=context,
                                   server_hostname=server_hostname or "",
                                   ssl_handshake_timeout=timeout),
            timeout + 1.0)
    except (OSError, EOFError, TimeoutError) as exc:
        sock.close()
        raise TlsFailed(tls_reason(exc)) from None


def peer_certificate(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The verified peer certificate of a TLS transport (None without one)."""
    cert = transport.get_extra_info("peercert")
    return cert if isinstance(cert, dict) and cert else None
