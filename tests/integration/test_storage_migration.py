"""Migration without shared storage, driven exactly as libvirt drives QEMU 7.2
(issue 12): the destination exports its empty disk over NBD, the source mirrors
into it, and at pre-switchover the mirrors are cancelled (a final sync, no
pivot) before the migration completes.  Every pairing of qmpd and QEMU, with
guest writes landing on the source while the mirror runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    Peer,
    Proxy,
    create_qcow2,
    image_check,
    short_dir,
)
from tests.support.certs import CLIENT_DN, Pki
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu("qemu-system-x86_64")

SIZE = 64 << 20
PAIRS = [("qemu", "qemu"), ("qmpd", "qmpd"), ("qemu", "qmpd"), ("qmpd", "qemu")]


@pytest.fixture
def work() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def wait_event(peer: Peer, name: str, timeout: float = 30.0, status: str | None = None,
               device: str | None = None) -> dict[str, Any]:
    ev = peer.qmp.wait_event(name, status=status, timeout=timeout)
    assert device is None or ev["data"]["device"] == device, ev
    return dict(ev)


def add_disk(peer: Peer, image: Path) -> None:
    peer.ok("blockdev-add", {"node-name": "disk-storage", "driver": "file",
                             "filename": str(image)})
    peer.ok("blockdev-add", {"node-name": "disk", "driver": "qcow2", "file": "disk-storage"})


def storage_migration(cluster: Cluster, work: Path, src_kind: str, dst_kind: str,
                      src_image: Path, dst_image: Path,
                      pki: Pki | None = None) -> tuple[Peer, Peer]:
    """libvirt's flow, up to a running destination; returns (source, destination).

    With ``pki``, NBD goes over TLS as libvirt sets it up: credentials objects
    on both sides, ``tls-creds`` (and an authz) on ``nbd-server-start``,
    ``tls-creds`` and ``tls-hostname`` on the source's nbd node."""
    src = cluster(src_kind, "src")
    dst = cluster(dst_kind, "dst", incoming="defer", paused=True)
    nbd_sock = str(work / "nbd.sock")
    mig_uri = f"unix:{work / 'mig.sock'}"
    server_tls: dict[str, Any] = {}
    client_tls: dict[str, Any] = {}
    if pki is not None:
        dst.ok("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                              "dir": str(pki.dir("server")), "endpoint": "server"})
        dst.ok("object-add", {"qom-type": "authz-simple", "id": "authz0",
                              "identity": CLIENT_DN})
        src.ok("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                              "dir": str(pki.dir("client")), "endpoint": "client"})
        server_tls = {"tls-creds": "tls0", "tls-authz": "authz0"}
        client_tls = {"tls-creds": "tls0", "tls-hostname": "localhost"}

    # Destination: its own (empty) image, exported writable over NBD.
    dst.caps(events=True, late_block_activate=True)
    add_disk(dst, dst_image)
    dst.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}},
                                **server_tls})
    dst.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                "writable": True})

    # Source: an nbd node with raw on top, mirrored into until READY.
    src.caps(events=True, pause_before_switchover=True)
    add_disk(src, src_image)
    src.ok("blockdev-add", {"driver": "nbd", "node-name": "migration-disk-storage",
                            "server": {"type": "unix", "path": nbd_sock}, "export": "disk",
                            **client_tls})
    src.ok("blockdev-add", {"driver": "raw", "node-name": "migration-disk-format",
                            "file": "migration-disk-storage"})
    src.ok("blockdev-mirror", {"job-id": "drive-disk", "device": "disk",
                               "target": "migration-disk-format", "sync": "full",
                               "auto-dismiss": False})
    assert src.qemu_io("disk", "write -P 0x5a 1M 256k") == ""
    wait_event(src, "BLOCK_JOB_READY", device="drive-disk")
    # Guest writes after READY: the mirror copies them as they come.
    assert src.qemu_io("disk", "write -P 0x6b 8M 64k") == ""
    assert src.qemu_io("disk", f"write -P 0x7c {SIZE - 4096} 4k") == ""

    dst.ok("migrate-incoming", {"uri": mig_uri})
    src.ok("migrate", {"uri": mig_uri})
    wait_event(src, "MIGRATION", status="pre-switchover")
    assert src.status() == "finish-migrate"

    # The source is stopped: cancel the mirror (final sync, no pivot), let go
    # of the NBD target, and let the migration finish.
    src.ok("block-job-cancel", {"device": "drive-disk"})
    done = wait_event(src, "BLOCK_JOB_COMPLETED", device="drive-disk")
    assert "error" not in done["data"]
    assert done["data"]["offset"] == done["data"]["len"]
    src.ok("job-dismiss", {"id": "drive-disk"})
    src.ok("blockdev-del", {"node-name": "migration-disk-format"})
    src.ok("blockdev-del", {"node-name": "migration-disk-storage"})
    src.ok("migrate-continue", {"state": "pre-switchover"})
    assert src.wait_migration()["status"] == "completed"

    assert dst.wait_migration()["status"] == "completed"
    dst.ok("nbd-server-stop")
    dst.ok("cont")
    assert dst.status() == "running"
    return src, dst


@pytest.mark.parametrize(("src_kind", "dst_kind"), PAIRS)
def test_storage_migration_libvirt_flow(work: Path, src_kind: str, dst_kind: str) -> None:
    check_storage_migration(work, src_kind, dst_kind)


@pytest.mark.parametrize(("src_kind", "dst_kind"), [("qemu", "qmpd"), ("qmpd", "qemu")])
def test_storage_migration_over_tls(work: Path, pki: Pki, src_kind: str, dst_kind: str) -> None:
    """The same with NBD over TLS (issue 13), qmpd on either end, QEMU on the other."""
    check_storage_migration(work, src_kind, dst_kind, pki)


def check_storage_migration(work: Path, src_kind: str, dst_kind: str,
                            pki: Pki | None = None) -> None:
    src_image = create_qcow2(work / "src.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 32M 2M",
            str(src_image), check=True)
    dst_image = create_qcow2(work / "dst.qcow2", str(SIZE))
    cluster = Cluster(work)
    try:
        src, dst = storage_migration(cluster, work, src_kind, dst_kind, src_image, dst_image,
                                     pki)
        # The destination owns its disk now: it writes, and the source, quit,
        # has let go of everything.
        assert dst.qemu_io("disk", "write -P 0x33 16M 4k") == ""
        assert src.quit() == 0
        assert dst.quit() == 0
    finally:
        cluster.close()
    image_check(dst_image)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 16M 4k", str(src_image), check=True)
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(src_image), str(dst_image),
                   check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def start_mirror(cluster: Cluster, work: Path, src_kind: str, dst_kind: str,
                 src_image: Path, dst_image: Path, proxy: bool = False
                 ) -> tuple[Peer, Peer, Proxy | None]:
    """The first half of the flow: a slow mirror (1 MiB/s) under way into the
    destination (through a proxy that can cut the connection)."""
    src = cluster(src_kind, "src")
    dst = cluster(dst_kind, "dst", incoming="defer", paused=True)
    nbd_sock = str(work / "nbd.sock")
    via = Proxy(str(work / "proxy.sock"), nbd_sock) if proxy else None
    add_disk(dst, dst_image)
    dst.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
    dst.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                "writable": True})
    add_disk(src, src_image)
    path = via.listen_path if via is not None else nbd_sock
    src.ok("blockdev-add", {"driver": "nbd", "node-name": "migration-disk-storage",
                            "server": {"type": "unix", "path": path}, "export": "disk"})
    src.ok("blockdev-add", {"driver": "raw", "node-name": "migration-disk-format",
                            "file": "migration-disk-storage"})
    src.ok("blockdev-mirror", {"job-id": "drive-disk", "device": "disk",
                               "target": "migration-disk-format", "sync": "full",
                               "auto-dismiss": False, "speed": 1 << 20})
    deadline = time.monotonic() + 10
    while src.ok("query-block-jobs")[0]["offset"] == 0:
        assert time.monotonic() < deadline, "the mirror does not move"
        time.sleep(0.02)
    return src, dst, via


def source_still_serves(src: Peer, src_image: Path) -> None:
    """After a failed storage migration the source runs on, its disk writable."""
    assert src.status() == "running"
    assert src.qemu_io("disk", "write -P 0x44 40M 4k") == ""
    src.ok("blockdev-del", {"node-name": "migration-disk-format"})
    src.ok("blockdev-del", {"node-name": "migration-disk-storage"})
    assert src.quit() == 0
    image_check(src_image)
    res = qemu_io("-f", "qcow2", "-c", "read -P 0x44 40M 4k", "-c", "read -P 0x22 32M 2M",
                  str(src_image))
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res.stdout


# QEMU 7.2 as the source notices a dead destination late or never (its mirror
# waits on the NBD request in flight), so those faults run with qmpd only.
@pytest.mark.parametrize(("src_kind", "fault"), [
    ("qmpd", "destination-dies"), ("qmpd", "connection-cut"), ("qmpd", "job-cancel"),
    ("qemu", "job-cancel")])
def test_storage_migration_faults(work: Path, src_kind: str, fault: str) -> None:
    src_image = create_qcow2(work / "src.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 32M 8M", str(src_image), check=True)
    dst_image = create_qcow2(work / "dst.qcow2", str(SIZE))
    cluster = Cluster(work)
    try:
        src, dst, via = start_mirror(cluster, work, src_kind, "qmpd", src_image, dst_image,
                                     proxy=fault == "connection-cut")
        if fault in ("destination-dies", "connection-cut"):
            if via is not None:
                via.cut()
            else:
                dst.kill()
            done = wait_event(src, "BLOCK_JOB_COMPLETED", device="drive-disk")
            assert "error" in done["data"], done
            info = src.ok("query-jobs")
            assert info[0]["status"] == "concluded" and info[0].get("error"), info
        else:
            src.ok("job-cancel", {"id": "drive-disk"})
            wait_event(src, "BLOCK_JOB_CANCELLED", device="drive-disk")
            assert src.ok("query-jobs")[0]["status"] == "concluded"
        src.ok("job-dismiss", {"id": "drive-disk"})
        assert src.ok("query-jobs") == []
        source_still_serves(src, src_image)
        if fault == "connection-cut":
            # The destination lives on, and is still waiting for its migration.
            assert dst.alive() and dst.status() == "inmigrate"
    finally:
        cluster.close()
