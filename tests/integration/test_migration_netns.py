"""Two hosts: source and destination in separate network namespaces, over tcp.

The namespaces are joined by a veth pair with private addresses made up for
the test (10.213.N.1 and 10.213.N.2); nothing outside the sandbox is touched.
They share the filesystem (the image, the QMP unix sockets), as two hosts
share coherent storage.  Skipped with the reason where ``ip netns`` is not
available (not root, no CAP_SYS_ADMIN, no veth support).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    LockWatcher,
    assert_one_writer,
    create_qcow2,
    image_check,
    need_qemu,
    start,
)

pytestmark = pytest.mark.qemu


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[tuple[str, str, str, str]]:
    """Two namespaces (a, b) and their addresses; torn down afterwards."""
    tag = f"qmig{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    subnet = os.getpid() % 250 + 1
    addr_a, addr_b = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    probe = _ip("netns", "add", a)
    if probe.returncode != 0:
        pytest.skip(f"ip netns is not available here: {probe.stderr.strip()}")
    try:
        steps = [
            ("netns", "add", b),
            ("link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y"),
            ("link", "set", f"{tag}x", "netns", a),
            ("link", "set", f"{tag}y", "netns", b),
            ("-n", a, "addr", "add", f"{addr_a}/24", "dev", f"{tag}x"),
            ("-n", b, "addr", "add", f"{addr_b}/24", "dev", f"{tag}y"),
            ("-n", a, "link", "set", f"{tag}x", "up"),
            ("-n", b, "link", "set", f"{tag}y", "up"),
            ("-n", a, "link", "set", "lo", "up"),
            ("-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            res = _ip(*step)
            if res.returncode != 0:
                pytest.skip(f"cannot build the two-host network (ip {' '.join(step)}): "
                            f"{res.stderr.strip()}")
        yield a, b, addr_a, addr_b
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", b)


@pytest.mark.parametrize("src_kind", ["qmpd", "qemu"])
def test_migration_between_two_network_namespaces(hosts: tuple[str, str, str, str], mig: Cluster,
                                                   src_kind: str) -> None:
    if src_kind == "qemu":
        need_qemu()
    ns_a, ns_b, _, addr_b = hosts
    image = create_qcow2(mig.dir / "disk.qcow2", "1G")
    src = mig.spawn(src_kind, "src", netns=ns_a)
    dst = mig.spawn("qmpd", "dst", incoming="defer", netns=ns_b)
    start(src, dst)
    for side in (src, dst):
        side.caps(events=True)
    src.add_disk(image)
    assert src.qemu_io("disk", "write -P 0x2d 0 64k") == ""
    dst.add_disk(image)
    # The destination listens on its own address only; the source cannot
    # reach it through loopback, only over the veth link.
    assert dst.ok("migrate-incoming", {"uri": f"tcp:{addr_b}:0"}) == {}
    port = dst.migrate_info()["socket-address"][0]["port"]
    assert src.ok("migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
    refused = src.wait_migration()
    assert refused["status"] == "failed"
    assert refused["error-desc"] == f"Failed to connect to '127.0.0.1:{port}': Connection refused"
    assert_one_writer(image, [src, dst], src)
    with LockWatcher(image, src, dst):
        assert src.ok("migrate", {"uri": f"tcp:{addr_b}:{port}"}) == {}
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration() == {"status": "completed"}
        dst.qmp.wait_event("MIGRATION", "completed")
    assert (src.status(), dst.status()) == ("postmigrate", "running")
    assert_one_writer(image, [src, dst], dst)
    assert dst.qemu_io("disk", "read -P 0x2d 0 64k") == ""
    assert dst.qemu_io("disk", "write -P 0x2e 1M 64k") == ""
    assert "Pattern verification failed" not in dst.stdout()
    assert dst.qmp.names() == ["MIGRATION:setup", "MIGRATION:active", "RESUME",
                               "MIGRATION:completed"]
    assert dst.quit() == 0
    src.quit()
    image_check(image)
