"""The blocking QMP client every test uses, on a real socket.

It reads line by line (QMP ends each message with CRLF), so wire tests can
take the raw bytes (:meth:`QmpClient.recv_line`, :attr:`QmpClient.buf`,
:attr:`QmpClient.sock`) and the others parsed messages.  Every event is kept
in :attr:`QmpClient.events` and, with the replies to :meth:`QmpClient.cmd`,
in :attr:`QmpClient.log`, in arrival order.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qmpd.schema import Schema

Address = str | Path | tuple[str, int]

_SCHEMA: Schema | None = None


def schema() -> Schema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = Schema()
    return _SCHEMA


def check_message(msg: dict[str, Any], command: str | None = None) -> None:
    """Validate a return value or event against the schema the daemon ships."""
    if "event" in msg:
        problems = schema().validate_event(msg["event"], msg.get("data"))
        assert not problems, f"event {msg['event']} outside its schema: {problems}"
    elif "return" in msg and command is not None:
        problems = schema().validate_returns(command, msg["return"])
        assert not problems, f"{command} returned data outside its schema: {problems}"


def _connect(address: Address, timeout: float, wait: float,
             proc: subprocess.Popen[Any] | None) -> socket.socket:
    deadline = time.monotonic() + wait
    while True:
        try:
            if isinstance(address, tuple):
                return socket.create_connection(address, timeout=timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(address))
            except OSError:
                sock.close()
                raise
            return sock
        except OSError:
            if time.monotonic() >= deadline:
                raise
            assert proc is None or proc.poll() is None, f"{proc.args!r} exited"
            time.sleep(0.005)


class QmpClient:
    """A blocking QMP client on a real socket, for exact wire checks and event logs.

    ``address`` is a unix socket path, a (host, port) pair or a socket already
    connected or accepted.  ``wait`` retries the connection that long (while
    ``proc``, if given, lives).  With ``ids``, :meth:`cmd` numbers its
    requests, takes the ``id`` off the reply and sets aside replies to other
    requests in :attr:`stray`.  ``check_schema`` checks replies and events
    against qmpd's schema; ``trace`` keeps every line both ways in
    :attr:`transcript`.  ``tls`` (an ``ssl.SSLContext``) puts the connection
    under TLS before the greeting, checking ``server_hostname`` if given.
    """

    def __init__(self, address: Address | socket.socket, timeout: float = 10.0, *,
                 wait: float = 0.0, proc: subprocess.Popen[Any] | None = None,
                 check_schema: bool = True, ids: bool = False, trace: bool = False,
                 negotiate: bool = False, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        if isinstance(address, socket.socket):
            self.sock = address
            self.sock.settimeout(timeout)
        else:
            self.sock = _connect(address, timeout, wait, proc)
        if tls is not None:
            try:
                self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
            except BaseException:
                self.sock.close()
                raise
        self.timeout = timeout
        self.check_schema = check_schema
        self.ids = ids
        self.trace = trace
        self.buf = b""
        #: Raw lines both ways ("-> " sent, "<- " received), kept with ``trace``.
        self.transcript: list[bytes] = []
        #: Everything received after the greeting: ("event", msg) or ("reply", command, msg).
        self.log: list[tuple[Any, ...]] = []
        self.events: list[dict[str, Any]] = []
        #: Replies that answered no command of ours (with ``ids``; there should be none).
        self.stray: list[dict[str, Any]] = []
        self.next_id = 0
        self.greeting = self.recv()
        if negotiate:
            self.negotiate()

    # --- the wire ------------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        if self.trace:
            self.transcript.append(b"-> " + data.rstrip())
        self.sock.sendall(data)

    def send_msg(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send one message as a line, with file descriptors (SCM_RIGHTS) if given."""
        data = json.dumps(msg).encode() + b"\n"
        if not fds:
            self.send(data)
            return
        if self.trace:
            self.transcript.append(b"-> " + data.rstrip())
        socket.send_fds(self.sock, [data], list(fds))

    def recv_line(self, timeout: float | None = None) -> bytes:
        """The next line as sent, without its CRLF."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        buf = bytearray(self.buf)
        try:
            searched = 0
            while True:
                end = buf.find(b"\r\n", max(0, searched - 1))
                if end >= 0:
                    break
                searched = len(buf)
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise EOFError("the server closed the QMP connection")
                buf += chunk
        except BaseException:
            self.buf = bytes(buf)  # a timeout loses nothing already read
            raise
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)
        self.buf = bytes(buf[end + 2:])
        line = bytes(buf[:end])
        if self.trace:
            self.transcript.append(b"<- " + line)
        return line

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; events are also kept in :attr:`events` and :attr:`log`."""
        msg = json.loads(self.recv_line(timeout))
        assert isinstance(msg, dict), msg
        if "event" in msg:
            self.events.append(msg)
            self.log.append(("event", msg))
        return msg

    # --- commands ------------------------------------------------------------------

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None, *,
            fds: Sequence[int] = (), timeout: float | None = None, **extra: Any
            ) -> dict[str, Any]:
        """Send a command; return its reply (events before it are checked and kept)."""
        req: dict[str, Any] = {"execute": execute, **extra}
        if arguments is not None:
            req["arguments"] = arguments
        if self.ids:
            self.next_id += 1
            req["id"] = self.next_id
        self.send_msg(req, fds)
        while True:
            msg = self.recv(timeout)
            if self.check_schema:
                check_message(msg, execute)
            if "return" not in msg and "error" not in msg:
                continue
            if self.ids and msg.pop("id", None) != self.next_id:
                self.stray.append(msg)  # not the answer to this command
                continue
            self.log.append(("reply", execute, msg))
            return msg

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def ok(self, execute: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        reply = self.cmd(execute, arguments, **kw)
        assert "return" in reply, f"{execute} {arguments}: {reply}"
        return reply["return"]

    def err(self, execute: str, arguments: dict[str, Any] | None = None, **kw: Any) -> str:
        reply = self.cmd(execute, arguments, **kw)
        assert "error" in reply, f"{execute} {arguments}: expected an error, got {reply}"
        return str(reply["error"]["desc"])

    # --- events --------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """Read whatever arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.recv(left)
            except (TimeoutError, EOFError, ConnectionError):
                return

    def wait_event(self, name: str, status: str | None = None, timeout: float = 15.0,
                   since: int = 0) -> dict[str, Any]:
        """The first event ``name`` (with data.status ``status``) at index >= since."""
        deadline = time.monotonic() + timeout
        index = since
        while True:
            while index < len(self.events):
                ev = self.events[index]
                index += 1
                if ev["event"] == name and (
                    status is None or ev.get("data", {}).get("status") == status
                ):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                got = [e["event"] for e in self.events[since:]]
                raise TimeoutError(f"no event {name} {status or ''}; got {got}")
            try:
                self.recv(left)
            except TimeoutError:
                pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def wait_greeting(path: str, timeout: float = 10.0) -> bool:
    """Whether the QMP socket at ``path`` accepts a client and greets it."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
        data = b""
        while not data.endswith(b"\n"):
            chunk = probe.recv(4096)
            if not chunk:
                return False
            data += chunk
        return b'"QMP"' in data
    except OSError:
        return False
    finally:
        probe.close()
