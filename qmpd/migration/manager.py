"""What QMP commands and the daemon call: both directions behind one facade.

:class:`OutgoingMigration` (``outgoing.py``) is the source side,
:class:`IncomingMigration` (``incoming.py``) the destination side; they
share the capabilities, the parameters and the descriptors from getfd.
"""

from __future__ import annotations

from typing import Any

from qmpd.errors import GenericError
from qmpd.migration.channels import FdStore, TlsSettings
from qmpd.migration.deps import (
    BlockSide,
    Events,
    ExitRequest,
    MigrationMetrics,
    RunStateSide,
    TlsObjects,
)
from qmpd.migration.incoming import IncomingMigration
from qmpd.migration.outgoing import OutgoingMigration
from qmpd.migration.state import (
    CAPABILITIES,
    MigrationSettings,
    check_capabilities,
    check_parameters,
    normalize_parameters,
)
from qmpd.migration.stream.bitmaps import check_mapping


class MigrationManager:
    """Both directions of migration for one daemon."""

    def __init__(
        self, *, events: Events, vm: RunStateSide, block: BlockSide,
        metrics: MigrationMetrics, request_exit: ExitRequest,
        objects: TlsObjects | None = None, tls_handshake_timeout: float = 10.0,
    ) -> None:
        self.settings = MigrationSettings()
        self.fds = FdStore()
        self.objects = objects
        self.tls_handshake_timeout = tls_handshake_timeout
        self.outgoing = OutgoingMigration(
            self.settings, self.fds, events=events, vm=vm, block=block, metrics=metrics,
            tls=self.tls_settings)
        self.incoming = IncomingMigration(
            self.settings, self.fds, events=events, vm=vm, block=block, metrics=metrics,
            request_exit=request_exit, tls=self.tls_settings)

    def tls_settings(self) -> TlsSettings | None:
        """The TLS parameters now, or None without tls-creds (QEMU reads them per channel)."""
        params = self.settings.parameters
        if not params["tls-creds"] or self.objects is None:
            return None
        return TlsSettings(self.objects, params["tls-creds"], params["tls-hostname"],
                           params["tls-authz"], self.tls_handshake_timeout)

    @property
    def last_failure(self) -> str | None:
        """Why the last outgoing migration failed (None unless it did)."""
        return self.outgoing.last_failure

    # --- capabilities and parameters ---------------------------------------------------

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        if self.outgoing.running:
            raise GenericError("There's a migration process in progress")
        new = dict(self.settings.capabilities)
        for item in caps:
            new[item["capability"]] = item["state"]
        check_capabilities(new, self.settings.parameters)
        self.settings.capabilities = new

    def query_capabilities(self) -> list[dict[str, Any]]:
        caps = self.settings.capabilities
        return [{"capability": name, "state": caps[name]} for name in CAPABILITIES]

    def set_parameters(self, params: dict[str, Any]) -> None:
        params = normalize_parameters(params)
        merged = {**self.settings.parameters, **params}
        check_parameters(params)
        if "block-bitmap-mapping" in params:
            try:
                check_mapping(params["block-bitmap-mapping"])
            except ValueError as exc:
                raise GenericError(
                    f"Invalid mapping given for block-bitmap-mapping: {exc}") from None
        if "max-cpu-throttle" in params or "cpu-throttle-initial" in params:
            check_parameters(
                {"max-cpu-throttle": merged["max-cpu-throttle"],
                 "cpu-throttle-initial": merged["cpu-throttle-initial"]}
            )
        if self.settings.capabilities["zero-copy-send"] and (
            params.get("multifd-compression", "none") != "none" or params.get("tls-creds")
        ):
            raise GenericError(
                "Zero copy only available for non-compressed non-TLS multifd migration"
            )
        self.settings.parameters = merged

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.settings.parameters)

    # --- the two directions ---------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """query-migrate: the source's view if it ever migrated, else the destination's."""
        source = self.outgoing.info()
        return source if source is not None else self.incoming.info()

    def progress(self) -> dict[str, Any] | None:
        """The last migration's steps and timings (source's view first, as query)."""
        source = self.outgoing.progress()
        return source if source is not None else self.incoming.progress()

    def migrate(self, args: dict[str, Any]) -> None:
        self.outgoing.migrate(args)

    def cancel(self) -> None:
        self.outgoing.cancel()

    def continue_(self, state: str) -> None:
        self.outgoing.continue_(state)

    async def migrate_incoming(self, uri_text: str, exit_on_error: bool = True) -> None:
        await self.incoming.start(uri_text, exit_on_error)

    def after_cont_activation(self) -> None:
        """cont activated everything: a failed activation is resolved."""
        self.incoming.activation_error = None

    async def close(self) -> None:
        """Daemon shutdown: end both directions before the block layer closes."""
        await self.outgoing.close()
        await self.incoming.close()
