"""What QMP command handlers may use of the daemon, as Protocols.

The daemon (the composition root) builds one :class:`Services` from its
subsystems; a handler sees only these typed views, never the daemon itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from qmpd.block.bitmaps import ExternalActions
    from qmpd.block.graph import BlockNode
    from qmpd.jobs.job import Job
    from qmpd.runstate import RunState

T = TypeVar("T")


class GraphLockService(Protocol):
    """The block graph's serialisation point (see qmpd.block.serial)."""

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T: ...


class BitmapService(Protocol):
    """The dirty bitmap commands and their transaction."""

    def run(self, kind: str, args: dict[str, Any]) -> None: ...

    async def run_async(self, kind: str, args: dict[str, Any]) -> None: ...

    async def settled(self, name: str) -> None: ...

    def sha256(self, args: dict[str, Any]) -> dict[str, str]: ...

    async def transaction(self, actions: list[dict[str, Any]],
                          properties: dict[str, Any] | None = None,
                          external: ExternalActions | None = None) -> None: ...


class BlockService(Protocol):
    """The block layer: blockdev-add/-del, node queries, resize, activation."""

    @property
    def lock(self) -> GraphLockService: ...

    @property
    def bitmaps(self) -> BitmapService: ...

    async def add(self, options: dict[str, Any], inactive: bool = False) -> BlockNode: ...

    async def delete(self, name: str) -> None: ...

    def find(self, device: str | None, node_name: str | None) -> BlockNode: ...

    def named_nodes(self, flat: bool) -> list[dict[str, Any]]: ...

    async def resize(self, node: BlockNode, size: int) -> None: ...

    async def set_active(self, node_name: str | None, active: bool) -> None: ...

    async def snapshot(self, node: str, overlay: str) -> None: ...


class RunStateService(Protocol):
    """The virtual machine's run state: query-status, stop, cont."""

    @property
    def state(self) -> RunState: ...

    async def stop(self) -> None: ...

    async def cont(self) -> None: ...


class EventService(Protocol):
    """Where QMP events go."""

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None: ...


class ExportService(Protocol):
    """The NBD server and its block exports."""

    async def start_server(self, args: dict[str, Any]) -> None: ...

    async def stop_server(self) -> None: ...

    async def add(self, args: dict[str, Any]) -> None: ...

    async def legacy_add(self, args: dict[str, Any]) -> None: ...

    async def delete(self, export_id: str, mode: str = "safe") -> None: ...

    def query(self) -> list[dict[str, Any]]: ...


class ObjectService(Protocol):
    """The user-creatable objects (object-add, object-del) and their QOM view."""

    def add_object(self, options: dict[str, Any]) -> None: ...

    def delete(self, object_id: str) -> None: ...

    def qom_list(self, path: str) -> list[dict[str, str]]: ...

    def qom_get(self, path: str, prop: str) -> Any: ...

    def qom_list_types(self, implements: str | None, abstract: bool) -> list[dict[str, Any]]: ...


class FdService(Protocol):
    """Descriptors named by getfd, for migration's ``fd:`` URIs."""

    def add(self, name: str, fd: int) -> None: ...

    def close(self, name: str) -> None: ...


class MigrationService(Protocol):
    """What the migration commands call (both directions, one facade)."""

    @property
    def fds(self) -> FdService: ...

    def migrate(self, args: dict[str, Any]) -> None: ...

    async def migrate_incoming(self, uri_text: str, exit_on_error: bool = True) -> None: ...

    def query(self) -> dict[str, Any]: ...

    def cancel(self) -> None: ...

    def continue_(self, state: str) -> None: ...

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None: ...

    def query_capabilities(self) -> list[dict[str, Any]]: ...

    def set_parameters(self, params: dict[str, Any]) -> None: ...

    def query_parameters(self) -> dict[str, Any]: ...


class JobService(Protocol):
    """Jobs (job-*, block-job-*, query-jobs) and the commands that start them."""

    async def start(self, command: str, args: dict[str, Any]) -> None: ...

    def transaction_actions(self, properties: dict[str, Any] | None) -> ExternalActions: ...

    def query(self) -> list[dict[str, Any]]: ...

    def query_block(self) -> list[dict[str, Any]]: ...

    def find(self, job_id: str) -> Job: ...

    def find_block(self, device: str) -> Job: ...

    async def cancel(self, job: Job, force: bool) -> None: ...

    def pause(self, job: Job) -> None: ...

    def resume(self, job: Job) -> None: ...

    def complete(self, job: Job) -> None: ...

    async def finalize(self, job: Job) -> None: ...

    def dismiss(self, job: Job) -> None: ...

    def set_speed(self, job: Job, speed: int) -> None: ...


class ControlService(Protocol):
    """The daemon itself, as the control commands see it."""

    @property
    def name(self) -> str | None: ...

    @property
    def version_info(self) -> dict[str, Any]: ...

    def request_shutdown(self, cause: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a command handler may reach, each as its own typed service."""

    control: ControlService
    vm: RunStateService
    block: BlockService
    events: EventService
    exports: ExportService
    objects: ObjectService
    migration: MigrationService
    jobs: JobService
