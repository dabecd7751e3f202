"""qmpd.net: addresses from QAPI dicts, URIs and the command line; listen, connect, socket files.

Real sockets and files throughout.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpd import net
from qmpd.errors import ConfigError, GenericError
from qmpd.net import FdAddress, InetAddress, UnixAddress, VsockAddress


@pytest.fixture
def short(tmp_path: Path) -> Iterator[Path]:
    """A directory whose socket paths fit in sun_path."""
    link = Path(f"/tmp/qn{os.getpid()}")
    if link.is_symlink():
        link.unlink()
    link.symlink_to(tmp_path)
    yield link
    link.unlink()


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "want"), [
    ({"type": "unix", "path": "/p"}, UnixAddress("/p")),
    ({"type": "unix", "data": {"path": "/p", "abstract": True, "tight": False}},
     UnixAddress("/p", True, False)),
    ({"type": "inet", "host": "h", "port": "10809"}, InetAddress("h", "10809")),
    ({"type": "inet", "data": {"host": "::1", "port": "nbd", "numeric": True, "to": 5,
                               "ipv4": False, "ipv6": True, "keep-alive": True}},
     InetAddress("::1", "nbd", True, 5, False, True, True)),
    ({"type": "vsock", "cid": "2", "port": "5"}, VsockAddress("2", "5")),
    ({"type": "fd", "data": {"str": "fd0"}}, FdAddress("fd0")),
])
def test_socket_address_flat_and_legacy(addr: dict[str, object], want: net.SocketAddress) -> None:
    assert net.parse_socket_address(addr) == want


def test_legacy_form_refuses_flat_members() -> None:
    with pytest.raises(GenericError, match=r"^Parameter 'addr.path' is unexpected$"):
        net.parse_socket_address({"type": "unix", "path": "/a", "data": {"path": "/b"}})


def test_address_texts() -> None:
    assert [str(a) for a in (UnixAddress("/p"), UnixAddress("n", abstract=True),
                             InetAddress("::1", "4"), InetAddress("h", "4"),
                             VsockAddress("2", "5"), FdAddress("f"), net.StdioAddress())] == [
        "unix:/p", "unix:@n", "tcp:[::1]:4", "tcp:h:4", "vsock:2:5", "fd:f", "stdio"]


@pytest.mark.parametrize(("uri", "scheme", "address"), [
    ("tcp:127.0.0.1:4444", "tcp", InetAddress("127.0.0.1", "4444")),
    ("tcp:[::1]:4444", "tcp", InetAddress("::1", "4444")),
    ("tcp::4444", "tcp", InetAddress("", "4444")),
    ("tcp:host:http", "tcp", InetAddress("host", "http")),
    ("unix:/run/m.sock", "unix", UnixAddress("/run/m.sock")),
    ("fd:mig", "fd", FdAddress("mig")),
    ("exec:cat > /dev/null", "exec", None),
])
def test_migration_uri(uri: str, scheme: str, address: net.SocketAddress | None) -> None:
    parsed = net.parse_migration_uri(uri)
    assert (parsed.scheme, parsed.address) == (scheme, address)


@pytest.mark.parametrize(("uri", "text"), [
    ("tcp:nohost", "error parsing address 'nohost'"),
    ("tcp:[::1]4444", "error parsing address '[::1]4444'"),
    ("unix:", "invalid Unix socket address"),
    ("rdma:x", "Parameter 'uri' expects a valid migration protocol"),
])
def test_migration_uri_errors(uri: str, text: str) -> None:
    with pytest.raises(GenericError) as info:
        net.parse_migration_uri(uri)
    assert info.value.desc == text
    assert net.is_bad_protocol(info.value) == uri.startswith("rdma")


def test_host_port_from_the_command_line() -> None:
    assert net.parse_host_port(":4444", "127.0.0.1") == InetAddress("127.0.0.1", "4444")
    assert net.parse_host_port("[::1]:0080", "x") == InetAddress("::1", "80")
    with pytest.raises(ConfigError, match="port 65536 out of range"):
        net.parse_host_port("h:65536", "x")
    with pytest.raises(ConfigError, match="expected HOST:PORT, got 'h'"):
        net.parse_host_port("h", "x")


# --- UNIX socket files --------------------------------------------------------------------


def _in_use(path: Path) -> str:
    return f"Failed to bind socket to {path}: Address already in use"


def test_a_regular_file_is_never_removed(short: Path) -> None:
    path = short / "regular"
    path.write_text("keep me")
    with pytest.raises(net.ListenFailed) as info:
        net.listen(UnixAddress(str(path)))
    assert (info.value.errno, str(info.value)) == (errno.EADDRINUSE, _in_use(path))
    assert path.read_text() == "keep me"


def test_a_symlink_to_a_dead_socket_is_kept(short: Path) -> None:
    target = short / "dead.sock"
    probe = socket.socket(socket.AF_UNIX)
    probe.bind(str(target))
    probe.close()
    link = short / "link"
    link.symlink_to(target)
    with pytest.raises(net.ListenFailed):
        net.listen(UnixAddress(str(link)))
    assert link.is_symlink() and target.exists()


def test_a_dead_socket_is_replaced_and_a_live_one_refused(short: Path) -> None:
    path = short / "s"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    first = net.listen(UnixAddress(str(path)))
    try:
        assert net.is_listening(str(path))
        with pytest.raises(net.ListenFailed) as info:
            net.listen(UnixAddress(str(path)))
        assert str(info.value) == _in_use(path)
        assert net.is_listening(str(path))
    finally:
        first.close()
    assert not path.exists()


def test_close_leaves_a_file_someone_else_bound(short: Path) -> None:
    path = short / "s"
    listener = net.listen(UnixAddress(str(path)))
    os.unlink(path)  # while ours is open, its inode number cannot be reused
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    listener.close()
    assert path.exists()
    other.close()


def test_mode_of_the_socket_file(short: Path) -> None:
    private = net.listen(UnixAddress(str(short / "a")), mode=0o600)
    umask = os.umask(0o022)
    os.umask(umask)
    default = net.listen(UnixAddress(str(short / "b")))
    try:
        assert (short / "a").stat().st_mode & 0o777 == 0o600
        assert (short / "b").stat().st_mode & 0o777 == 0o777 & ~umask
    finally:
        private.close()
        default.close()


def test_too_long_a_path(tmp_path: Path) -> None:
    path = "/tmp/" + "x" * 120
    with pytest.raises(net.ListenFailed, match=f"^UNIX socket path '{path}' is too long$"):
        net.listen(UnixAddress(path))
    with pytest.raises(net.ConnectFailed, match=f"^UNIX socket path '{path}' is too long$"):
        asyncio.run(net.connect(UnixAddress(path)))


def test_bind_error_in_qemu_words(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such"
    with pytest.raises(net.ListenFailed) as info:
        net.listen(UnixAddress(str(path)))
    assert str(info.value) == f"Failed to bind socket to {path}: No such file or directory"


# --- inet, abstract, fd -------------------------------------------------------------------


def test_inet_port_zero_is_resolved_and_a_busy_port_refused() -> None:
    first = net.listen(InetAddress("127.0.0.1", "0"))
    try:
        assert isinstance(first.address, InetAddress)
        port = first.address.port
        assert port == str(first.sock.getsockname()[1]) and port != "0"
        with pytest.raises(net.ListenFailed) as info:
            net.listen(InetAddress("127.0.0.1", port))
        assert str(info.value) == "Failed to find an available port: Address already in use"
        with pytest.raises(net.ListenFailed) as info:
            net.listen(InetAddress("127.0.0.1", port), every_address=True)
        assert str(info.value) == "Failed to find an available port: Address already in use"
    finally:
        first.close()


def test_inet_resolution_failure() -> None:
    with pytest.raises(net.ListenFailed,
                       match=r"^address resolution failed for 127\.0\.0\.1:abc: "):
        net.listen(InetAddress("127.0.0.1", "abc"))


def test_every_address_listens_on_each() -> None:
    listener = net.listen(InetAddress("", "0"), every_address=True)
    try:
        families = {s.family for s in listener.socks}
        assert socket.AF_INET in families
        for sock in listener.socks:
            if sock.family == socket.AF_INET6:
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        listener.close()
    assert all(s.fileno() < 0 for s in listener.socks)


def test_fd_addresses_are_refused() -> None:
    with pytest.raises(net.ListenFailed, match=r"^only QEMU supports file descriptor passing$"):
        net.listen(FdAddress("x"))


def test_abstract_listen_and_connect() -> None:
    name = f"qmpd-test-{os.getpid()}"

    async def main() -> bytes:
        listener = net.listen(UnixAddress(name, abstract=True))
        try:
            assert listener.unix is None
            client = await net.connect(UnixAddress(name, abstract=True))
            peer, _ = listener.sock.accept()
            peer.sendall(b"hi")
            loop = asyncio.get_running_loop()
            data = await loop.sock_recv(client, 2)
            client.close()
            peer.close()
            return data
        finally:
            listener.close()

    assert asyncio.run(main()) == b"hi"


# --- connect ------------------------------------------------------------------------------


def test_connect_failures_in_qemu_words(tmp_path: Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    missing = tmp_path / "missing.sock"
    cases = [
        (UnixAddress(str(missing)),
         f"Failed to connect to '{missing}': No such file or directory"),
        (InetAddress("127.0.0.1", str(port)),
         f"Failed to connect to '127.0.0.1:{port}': Connection refused"),
    ]
    for address, text in cases:
        with pytest.raises(net.ConnectFailed) as info:
            asyncio.run(net.connect(address))
        assert str(info.value) == info.value.strerror == text
    with pytest.raises(net.ConnectFailed, match=r"^address resolution failed for 127\.0\.0\.1:x: "):
        asyncio.run(net.connect(InetAddress("127.0.0.1", "x")))


def test_connect_to_a_listener() -> None:
    async def main() -> None:
        listener = net.listen(InetAddress("127.0.0.1", "0"))
        try:
            sock = await net.connect(listener.address)
            assert sock.getpeername() == listener.sock.getsockname()
            sock.close()
        finally:
            listener.close()

    asyncio.run(main())


def test_the_command_line_does_not_load_the_qmp_server() -> None:
    """cli takes addresses from net and MonitorConfig from qmp.config, not the asyncio server."""
    code = "import sys, qmpd.cli; print(sorted(m for m in sys.modules if m.startswith('qmpd.')))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    loaded = out.stdout
    assert "'qmpd.net'" in loaded
    assert "qmpd.qmp.server" not in loaded and "qmpd.nbd.server" not in loaded


def test_vsock_address_texts() -> None:
    with pytest.raises(net.ListenFailed, match=r"^Invalid CID 'x' or port '1'$"):
        net.listen(VsockAddress("x", "1"))
    with pytest.raises(net.ConnectFailed, match=r"^Invalid CID '2' or port 'p'$"):
        asyncio.run(net.connect(VsockAddress("2", "p")))


async def _accept_cancelled_as_ready(accept: Any, tmp_path: Path) -> list[dict[str, Any]]:
    """Cancel an accept and close its listener in the turn of the loop in which
    the listener turned readable (ahead of the reader's callback, as an
    nbd-server-stop handled in that turn): what the loop reported."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    path = str(tmp_path / "l.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    task = asyncio.ensure_future(accept(listener))
    await asyncio.sleep(0)  # waiting for a connection now
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)  # queued: the listener is readable at the next select

    def stop() -> None:
        task.cancel()
        listener.close()

    loop.call_soon(stop)  # ahead of the reader callback that select adds
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):
        await asyncio.sleep(0)
    client.close()
    return reported


async def test_accept_cancelled_with_its_listener_readable_reports_nothing(
        tmp_path: Path) -> None:
    assert await _accept_cancelled_as_ready(net.accept, tmp_path) == []


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the control needs Python 3.11's race")
async def test_control_loop_sock_accept_reports_an_error_there(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    reported = await _accept_cancelled_as_ready(loop.sock_accept, tmp_path)
    assert any(isinstance(c.get("exception"), asyncio.InvalidStateError) for c in reported), \
        reported
