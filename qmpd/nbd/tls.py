"""NBD over TLS, server side: NBD_OPT_STARTTLS, then everything encrypted.

The server's connections do their own socket I/O (reader and writer
callbacks, ``sendmsg``), so TLS sits between the socket and the protocol as
an :class:`ssl.SSLObject` over two memory BIOs (:class:`TlsSession`), as
asyncio's own SSL transport does: ciphertext read from the socket is
:meth:`TlsSession.feed`, plaintext comes out of :meth:`TlsSession.read_into`,
replies go in through :meth:`TlsSession.seal` and leave as ciphertext.
:class:`TlsConnection` is the server connection that does this once the
sans-IO handshake says :class:`qmpd.nbd.protocol.StartTls`: the ACK leaves
in the clear, then the TLS handshake (within ``handshake_timeout``), the
authz check of the client's DN, and the option haggling goes on encrypted.

Why a handshake failed is logged in QEMU 7.2's words
(:func:`qmpd.nbd.client.tls_failure_reason`, ``crypto/tlssession.c``'s
texts, prefixed with "option negotiation failed: " as QEMU's server does).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from qmpd import net
from qmpd.buffers import aligned_buffer
from qmpd.nbd import protocol as p
from qmpd.nbd.client import tls_failure_reason
from qmpd.nbd.server import (
    FLUSH_BUDGET,
    HANDSHAKE_TIMEOUT,
    READS_PER_WAKEUP,
    NbdConnection,
    NbdServer,
    _pread_zero_filled,
)

log = logging.getLogger(__name__)

#: Plaintext sealed at a time: TLS records are at most 16 KiB, and a few of
#: them per ``SSLObject.write`` keep the per-call cost low.
SEAL_CHUNK = 256 * 1024
#: Ciphertext taken from the socket at a time.
TLS_RECV = 256 * 1024
#: Ciphertext made ahead while the socket is full.
SEAL_AHEAD = 1024 * 1024
#: Plaintext decrypted before the requests in it are parsed and started.
TLS_BATCH = 256 * 1024
#: How long a refused client's last bytes are read and dropped before the
#: socket is closed (see :meth:`TlsConnection._refuse`).
LINGER_TIMEOUT = 2.0
#: At most this many refused clients linger at once (each holds a socket
#: outside max-connections); those beyond are closed at once.
MAX_LINGERING = 16

class TlsSession:
    """One connection's TLS state: handshake, decryption, encryption."""

    def __init__(self, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)
        self.established = False
        #: The peer sent close_notify (or the input ended).
        self.eof = False
        # SSLObject.read is a Python wrapper around this C method; called
        # once per TLS record (16 KiB at most), the wrapper's frame is a
        # good part of the cost of a record.
        self._read = cast(Callable[[int, memoryview], int],
                          getattr(self.obj, "_sslobj", self.obj).read)

    def feed(self, data: bytes | memoryview) -> None:
        """Ciphertext received from the peer."""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def handshake(self) -> bool:
        """Advance the handshake: True once done; ssl.SSLError when it failed."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.established = True
        return True

    def outgoing(self) -> bytes:
        """Ciphertext to send (handshake messages, sealed records, alerts)."""
        return self._out.read()

    @property
    def buffered(self) -> bool:
        """Whether input is waiting that :meth:`read_into` has not taken."""
        return self.obj.pending() > 0 or self._in.pending > 0

    def read_into(self, buffer: memoryview | bytearray) -> int:
        """Decrypt into ``buffer``: bytes placed, 0 when more ciphertext is needed
        (and at the end of the stream: see :attr:`eof`); ssl.SSLError on bad input."""
        try:
            n: int = self.obj.read(len(buffer), buffer)  # type: ignore[assignment]
            return n
        except ssl.SSLWantReadError:
            return 0
        except ssl.SSLZeroReturnError:
            self.eof = True
            return 0
        except ssl.SSLEOFError:
            self.eof = True
            return 0

    def read_into_all(self, buffer: memoryview, limit: int) -> int:
        """Decrypt records into ``buffer`` until it is full, ``limit`` bytes came, or
        more ciphertext is needed (see :attr:`eof`); bytes placed. ssl.SSLError on bad input.

        One call for many records: what a large ``recv_into`` is to a socket.
        """
        read = self._read
        size = len(buffer)
        filled = 0
        try:
            while filled < size and filled < limit:
                n = read(size - filled, buffer[filled:])
                if not n:
                    self.eof = True
                    break
                filled += n
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.eof = True
        return filled

    def seal(self, parts: Iterable[bytes | memoryview]) -> bytes:
        """Encrypt ``parts`` in order; the ciphertext to send."""
        pending = bytearray()
        for part in parts:
            if len(pending) + len(part) < SEAL_CHUNK:
                pending += part
                continue
            if pending:
                self.obj.write(pending)
                pending.clear()
            self.obj.write(part)
        if pending:
            self.obj.write(pending)
        return self._out.read()

    def peer_certificate(self) -> dict[str, Any] | None:
        cert = self.obj.getpeercert()
        return cert if isinstance(cert, dict) and cert else None


@dataclass(frozen=True)
class ServerTls:
    """The NBD server's TLS (``tls-creds``, ``tls-authz``): STARTTLS is required."""

    context: ssl.SSLContext
    #: Why a verified client certificate is refused (QEMU's text), or None.
    check_peer: Callable[[dict[str, Any] | None], str | None] | None
    #: A client must finish the TLS handshake within this many seconds.
    handshake_timeout: float


class TlsConnection(NbdConnection):
    """A connection to a server with TLS credentials."""

    sends_plain = False

    def __init__(self, server: NbdServer, sock: socket.socket, config: ServerTls) -> None:
        super().__init__(server, sock)
        self.config = config
        self.handshake = p.ServerHandshake(server.exports, tls=True)
        #: The TLS session, from NBD_OPT_STARTTLS on.
        self.tls: TlsSession | None = None
        #: Ciphertext bytes at the front of :attr:`_out` (the rest is plaintext).
        self._sealed = 0
        #: How many items at the front of :attr:`_out` are ciphertext.
        self._sealed_items = 0
        self._tls_leftover: bytes | None = None
        #: Refused: what the client still sends is read and dropped (:meth:`_refuse`).
        self._lingering = False
        self._scratch = bytearray(65536)
        #: Where file data is read before it is encrypted (page-aligned:
        #: qmpd.buffers).
        self._file_view = aligned_buffer(FLUSH_BUDGET)
        #: Where ciphertext is received (then copied into the session).
        self._raw = bytearray(TLS_RECV)
        self._raw_view = memoryview(self._raw)

    # --- the base's hooks -------------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        was = self.reading
        super()._set_reading(on)
        if on and not was and self.reading and self.tls is not None and self.tls.buffered:
            self.loop.call_soon(self._tls_input)  # received, not taken yet

    def _receive(self) -> None:
        if self.tls is None:
            super()._receive()
        else:
            self._readable_tls()

    def _flush(self) -> None:
        if self.tls is None:
            super()._flush()
        else:
            self._flush_tls()

    def _after_flush(self) -> None:
        super()._after_flush()
        if not self._out and self._tls_leftover is not None and not self.closed:
            self._begin_tls()

    def _handshake_timeout(self) -> None:
        if self.tx is None and not self.closed and self.tls is not None \
                and not self.tls.established:
            self._negotiation_failed("the TLS handshake took too long")
            return
        super()._handshake_timeout()

    # --- TLS ----------------------------------------------------------------------------

    def _start_tls(self, leftover: bytes) -> None:
        """STARTTLS was ACKed: send the ACK in the clear, then the TLS handshake."""
        self._set_reading(False)
        self._tls_leftover = leftover
        self._flush()
        if not self.closed:
            self._kick()  # the rest of the ACK, then _after_flush begins TLS

    def _begin_tls(self) -> None:
        tls = self.config
        assert tls is not None and self._tls_leftover is not None
        leftover, self._tls_leftover = self._tls_leftover, None
        self.tls = TlsSession(tls.context, server_side=True)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(tls.handshake_timeout, self._handshake_timeout)
        if leftover:
            self.tls.feed(leftover)
        self._set_reading(True)
        self._tls_handshake()

    def _readable_tls(self) -> None:
        # Drain the socket (a few receives) before decrypting: what is left
        # unread would count as a client still sending, and hold replies back.
        tls = self.tls
        assert tls is not None
        for _ in range(READS_PER_WAKEUP):
            try:
                n = self.sock.recv_into(self._raw)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("NBD client %s: %s", self.peer, exc)
                self._close()
                return
            tls.feed(self._raw_view[:n])
            if not n:
                self._set_reading(False)
                break
            if n < TLS_RECV:
                break
        self._tls_input()

    def _tls_input(self) -> None:
        """Take what TLS has: handshake messages, then plaintext for the protocol."""
        tls = self.tls
        if tls is None or self.closed:
            return
        try:
            if not tls.established:
                self._tls_handshake()
                return
            while not self.closed:
                if self.tx is not None:
                    # Decrypt a batch of records, then parse them in one pump.
                    if not self._decrypt(tls, self.tx):
                        break
                    self._pump()
                elif self.handshake is not None:
                    n = tls.read_into(self._scratch)
                    if not n:
                        break
                    self.handshake.receive_data(bytes(self._scratch[:n]))
                    self._pump_handshake()
                else:
                    return
                if not self.reading:
                    return  # paused: the rest waits in the session
            if tls.eof and not self.closed:
                self._eof()
        except ssl.SSLError as exc:
            log.info("NBD client %s: %s; disconnecting", self.peer, net.tls_reason(exc))
            self._close()
        except Exception:  # a bug must not take the daemon down: drop this client
            log.exception("NBD client %s: internal error; disconnecting", self.peer)
            self._close()

    @staticmethod
    def _decrypt(tls: TlsSession, tx: p.Transmission) -> int:
        """Decrypt a batch into the protocol's buffers; bytes taken.

        A WRITE's payload is filled whole (many records, one call); after a
        large WRITE only the next record is taken before it is parsed, so that
        the following payload lands in its own buffer rather than being
        copied out of the header buffer.
        """
        got = 0
        while got < TLS_BATCH:
            buf = tx.get_buffer()
            limit = 1 if tx.header_first else TLS_BATCH - got
            n = tls.read_into_all(buf, limit)
            if n:
                tx.buffer_updated(n)
                got += n
            if (n < len(buf) and n < limit) or limit == 1:
                break  # more ciphertext is needed, or a header to parse first
        return got

    def _tls_handshake(self) -> None:
        tls = self.tls
        server_tls = self.config
        assert tls is not None and server_tls is not None
        try:
            done = tls.handshake()
        except (ssl.SSLError, OSError) as exc:
            self._refuse(tls_failure_reason(exc), tls.outgoing())
            return
        out = tls.outgoing()
        if out:
            self._send_sealed(out)
        if not done:
            return
        if server_tls.check_peer is not None:
            refused = server_tls.check_peer(tls.peer_certificate())
            if refused is not None:
                self._refuse(refused)
                return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        self._tls_input()

    def _refuse(self, reason: str, alert: bytes = b"") -> None:
        """Refuse the client in or right after the TLS handshake: the alert (best
        effort), then a lingering close.

        OpenSSL refuses a client certificate as soon as it arrives, while the
        client may still be sending the rest of its flight (CertificateVerify,
        Finished) or its first option.  Closed with those bytes unread, the socket
        would answer them with a reset: the client's handshake fails on EPIPE
        half-way (QEMU 7.2's client then waits for ever in blockdev-add), and the
        reset can discard the alert before the client reads it.  So our side is
        shut down and what still comes is read and dropped until the client hangs
        up, for :data:`LINGER_TIMEOUT` at most.  (QEMU's server, on GnuTLS, checks
        the certificate only once the handshake is done.)
        """
        log.warning("NBD client %s: option negotiation failed: %s", self.peer, reason)
        self.handshake = None
        self.tls = None  # nothing more is decrypted or sealed
        self._set_reading(False)
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self._out.clear()
        self._out_bytes = self._sealed = self._sealed_items = 0
        if self._timer is not None:
            self._timer.cancel()
        try:
            if alert:
                self.sock.send(alert)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        if len(self.server.lingering) >= MAX_LINGERING:
            self._close()
            return
        # Not through self.reading: a receive loop under way must stop here.
        self.loop.add_reader(self.fd, self._linger)
        self._lingering = True
        self._timer = self.loop.call_later(LINGER_TIMEOUT, self._close)
        # Refused, it is no client any more (QEMU's server has dropped it by
        # now): a silent one must not keep a max-connections slot meanwhile.
        self.server.connections.discard(self)
        self.server.lingering.add(self)
        self.server.connection_gone()

    def _close(self) -> None:
        if self._lingering:
            self._lingering = False
            self.loop.remove_reader(self.fd)
            self.server.lingering.discard(self)
        super()._close()

    def _linger(self) -> None:
        try:
            if self.sock.recv_into(self._raw):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close()

    def _send_sealed(self, data: bytes) -> None:
        """Queue ciphertext (handshake messages) ahead of any plaintext not yet sealed."""
        self._out.insert(self._sealed_items, memoryview(data))
        self._sealed_items += 1
        self._sealed += len(data)
        self._out_bytes += len(data)
        self._kick()

    def _seal_front(self, budget: int) -> None:
        """Encrypt queued replies (about ``budget`` bytes) into one buffer, queued
        after the ciphertext already at the front."""
        tls = self.tls
        assert tls is not None
        out = self._out
        first = self._sealed_items
        parts: list[bytes | memoryview] = []
        plain = 0
        spans = 0  # bytes of the file buffer used by this batch
        while len(out) > first and plain < budget:
            item = out[first]
            del out[first]
            if isinstance(item, p.FileSpan):
                # Read into one buffer kept for the connection: a fresh
                # object per read costs page faults at these sizes.
                if spans + item.length <= len(self._file_view):
                    view = self._file_view[spans:spans + item.length]
                    n = os.preadv(item.fd, [view], item.offset)
                    if n < item.length:  # the file shrank: zeros, as promised
                        view[n:] = bytes(item.length - n)
                    spans += item.length
                    item = view
                else:
                    item = memoryview(_pread_zero_filled(item))
            parts.append(item)
            plain += len(item)
        if not parts:
            return
        sealed = tls.seal(parts)
        out.insert(first, memoryview(sealed))
        self._sealed_items += 1
        self._sealed += len(sealed)
        self._out_bytes += len(sealed) - plain

    def _seal_ahead(self) -> None:
        """While the client has not taken what was sent, encrypt what comes next:
        it is ready when the socket is, and the client is not kept waiting for
        the encryption of the next batch."""
        if self._sealed < SEAL_AHEAD and len(self._out) > self._sealed_items:
            self._seal_front(SEAL_AHEAD - self._sealed)

    def _flush_tls(self) -> None:
        out = self._out
        self._unsent_replies = 0
        budget = FLUSH_BUDGET
        while out and budget > 0:
            if not self._sealed:
                self._seal_front(budget)
            head = out[0]
            assert not isinstance(head, p.FileSpan)
            try:
                sent = self.sock.send(head)
            except (BlockingIOError, InterruptedError):
                self._seal_ahead()
                return
            except OSError as exc:
                log.debug("NBD client %s: %s", self.peer, exc)
                self._close()
                return
            self._out_bytes -= sent
            self._sealed -= sent
            budget -= sent
            if sent < len(head):
                out[0] = head[sent:]
                self._seal_ahead()
                return
            out.popleft()
            self._sealed_items -= 1
