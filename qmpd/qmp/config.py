"""What a QMP monitor is configured with; no asyncio, so the command line can import it."""

from __future__ import annotations

from dataclasses import dataclass

from qmpd.net import SocketAddress, StdioAddress

#: Output buffered for one client before it is disconnected.
DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class MonitorConfig:
    """One QMP monitor: where it listens and how it formats output."""

    id: str
    address: SocketAddress | StdioAddress
    pretty: bool = False
    #: Connect to a listening peer instead of listening (chardev server=off).
    client: bool = False
    #: Listen, and hold start-up until the first client connects (wait=on).
    wait: bool = False
    #: The option that asked for it, for errors ("--chardev socket,...").
    origin: str = ""
    #: TLS: the id of a tls-creds-x509 object (TCP only), and of an authz object
    #: that must allow the client certificate's DN.
    tls_creds: str | None = None
    tls_authz: str | None = None
