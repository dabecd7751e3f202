"""What migration needs from the rest of the daemon, as Protocols.

The daemon passes these in; migration never sees the daemon itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from qmpd.runstate import RunState

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode
    from qmpd.objects.authz import Authz
    from qmpd.objects.tls import TlsCredsX509


class Events(Protocol):
    """Where QMP events go."""

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None: ...

    def rehearse(self, name: str, data: dict[str, Any] | None = None) -> bytes: ...


class GraphLockSide(Protocol):
    """The block graph's serialisation point, held across switchover steps."""

    def held(self) -> AbstractAsyncContextManager[None]: ...


class GraphSide(Protocol):
    """The block graph: its nodes and the re-read of nodes activated early."""

    @property
    def nodes(self) -> Mapping[str, BlockNode]: ...

    def all_nodes(self) -> Iterable[BlockNode]: ...

    async def reload_active(self, nodes: Iterable[BlockNode]) -> None: ...


class BlockSide(Protocol):
    """The block layer: activation of every node, and the graph lock."""

    @property
    def lock(self) -> GraphLockSide: ...

    @property
    def graph(self) -> GraphSide: ...

    async def flush_all(self) -> None: ...

    async def write_back_early(self) -> None: ...

    async def activate_all(self) -> None: ...

    async def inactivate_all(self) -> None: ...

    def rehearse_inactivation(self) -> None: ...


class RunStateSide(Protocol):
    """The VM's run state and autostart."""

    autostart: bool

    @property
    def state(self) -> RunState: ...

    def set_state(self, state: RunState) -> None: ...

    def start(self) -> None: ...


class Increment(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class LabelledCounter(Protocol):
    """A counter with labels (prometheus_client's Counter is one)."""

    def labels(self, *values: str) -> Increment: ...


class MigrationMetrics(Protocol):
    """The migration series of the daemon's metrics."""

    @property
    def migration_bytes(self) -> LabelledCounter: ...

    def migration_status(self, status: str) -> None: ...

    def migration_done(self, total: float, downtime: float) -> None: ...

    def observe_activate_all(self, seconds: float) -> None: ...


class TlsObjects(Protocol):
    """The daemon's objects: TLS credentials and authorization lists by id (QEMU's texts)."""

    def tls_creds(self, name: str, endpoint: str | None = None) -> TlsCredsX509: ...

    def authz(self, name: str) -> Authz: ...

    def hold(self, obj: TlsCredsX509 | Authz, user: str) -> None: ...

    def release(self, obj: TlsCredsX509 | Authz, user: str) -> None: ...


#: Leave the process with this status (a failed incoming migration exits 1).
ExitRequest = Callable[[int], None]


class _NoCount:
    def labels(self, *values: str) -> _NoCount:
        return self

    def inc(self, amount: float = 1) -> None:
        return None


class NoMigrationMetrics:
    """The series where nobody reads them (no --http): nothing is kept, and
    prometheus_client is not imported for them."""

    migration_bytes: LabelledCounter = _NoCount()

    def migration_status(self, status: str) -> None:
        return None

    def migration_done(self, total: float, downtime: float) -> None:
        return None

    def observe_activate_all(self, seconds: float) -> None:
        return None
