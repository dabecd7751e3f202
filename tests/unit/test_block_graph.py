"""The block graph's permissions and node states, on real image files."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.block.driver import (
    PERM_ALL,
    BdrvChild,
    BlockNode,
    ChildRole,
    NodeState,
    NodeUser,
    Perm,
)
from qmpd.block.qcow2.create import create_image
from qmpd.block.registry import DRIVERS, probe_format
from qmpd.errors import BlockDriverError, GenericError

MiB = 1 << 20


def raw_file(tmp_path: Path, name: str = "disk.raw", size: int = MiB) -> str:
    path = tmp_path / name
    path.write_bytes(bytes(size))
    return str(path)


def qcow2_file(tmp_path: Path, name: str = "disk.qcow2") -> str:
    path = str(tmp_path / name)
    create_image(path, 4 * MiB)
    return path


def qcow2_options(path: str, name: str = "fmt", **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "node-name": f"{name}-file", "filename": path},
            **extra}


class Job(NodeUser):
    """A user that writes and lets nobody else write (as a mirror job would)."""

    def permissions(self, node: BlockNode) -> tuple[Perm, Perm]:
        return Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


def edge_for(node: BlockNode, user: NodeUser) -> BdrvChild:
    return BdrvChild(name="root", role=ChildRole.image(), child=node, user=user)


# --- permissions -----------------------------------------------------------------------


async def test_user_permissions_follow_the_callback(tmp_path: Path, layer: BlockLayer) -> None:
    node = await layer.add({"driver": "file", "node-name": "disk",
                            "filename": raw_file(tmp_path)})
    assert node.cumulative_perms() == (Perm.NONE, PERM_ALL)
    reader = edge_for(node, NodeUser("export", "r", writable=False))
    await layer.graph.add_user(reader)
    assert node.cumulative_perms() == (Perm.CONSISTENT_READ, PERM_ALL & ~Perm.RESIZE)
    writer = edge_for(node, NodeUser("export", "w", writable=True))
    await layer.graph.add_user(writer)
    assert node.cumulative_perms()[0] == Perm.CONSISTENT_READ | Perm.WRITE
    await layer.graph.remove_user(writer)
    await layer.graph.remove_user(reader)
    assert node.parents == []
    assert node.cumulative_perms() == (Perm.NONE, PERM_ALL)


async def test_conflicting_users_refused_then_released(
    tmp_path: Path, layer: BlockLayer
) -> None:
    node = await layer.add({"driver": "file", "node-name": "disk",
                            "filename": raw_file(tmp_path)})
    job = edge_for(node, Job("job", "j1", writable=True))
    await layer.graph.add_user(job)
    export = edge_for(node, NodeUser("export", "e1", writable=True))
    with pytest.raises(GenericError) as exc:
        await layer.graph.add_user(export)
    assert exc.value.desc == (
        "Permission conflict on node 'disk': permissions 'write' are both required by "
        "export 'e1' (uses node 'disk' as 'root' child) and unshared by "
        "job 'j1' (uses node 'disk' as 'root' child)."
    )
    assert node.parents == [job]
    # A reader asks for nothing the job refuses.
    reader = edge_for(node, NodeUser("export", "r", writable=False))
    await layer.graph.add_user(reader)
    await layer.graph.remove_user(reader)
    # Released on removal: the writer is welcome once the job is gone.
    await layer.graph.remove_user(job)
    await layer.graph.add_user(export)
    assert node.parents == [export]


async def test_format_parent_refuses_a_second_writer_of_its_file(
    tmp_path: Path, layer: BlockLayer
) -> None:
    await layer.add(qcow2_options(qcow2_file(tmp_path)))
    file = layer.graph.lookup("fmt-file")
    assert file is not None
    perm, shared = file.cumulative_perms()
    assert perm & Perm.WRITE and perm & Perm.RESIZE
    assert not shared & (Perm.WRITE | Perm.RESIZE)
    with pytest.raises(GenericError) as exc:
        await layer.graph.add_user(edge_for(file, NodeUser("export", "e1", writable=True)))
    assert exc.value.desc == (
        "Permission conflict on node 'fmt-file': permissions 'write' are both required by "
        "export 'e1' (uses node 'fmt-file' as 'root' child) and unshared by "
        "node 'fmt' (uses node 'fmt-file' as 'file' child)."
    )
    # Deleting the format node releases its file: then a writer may use it.
    await layer.delete("fmt")
    standalone = await layer.add({"driver": "file", "node-name": "again",
                                  "filename": str(tmp_path / "disk.qcow2")})
    await layer.graph.add_user(edge_for(standalone, NodeUser("export", "e1", writable=True)))


async def test_node_in_use_by_a_user_cannot_be_deleted(
    tmp_path: Path, layer: BlockLayer
) -> None:
    node = await layer.add({"driver": "file", "node-name": "disk",
                            "filename": raw_file(tmp_path)})
    edge = edge_for(node, NodeUser("export", "e1", writable=False))
    await layer.graph.add_user(edge)
    with pytest.raises(GenericError, match=r"^Node disk is in use$"):
        await layer.delete("disk")
    await layer.graph.remove_user(edge)
    await layer.delete("disk")
    assert layer.graph.lookup("disk") is None


# --- activation and inactivation -------------------------------------------------------


async def test_inactive_node_refuses_writes_and_resize(
    tmp_path: Path, layer: BlockLayer
) -> None:
    node = await layer.add(qcow2_options(qcow2_file(tmp_path)), inactive=True)
    file = node.file
    assert file is not None
    assert node.state is NodeState.INACTIVE and file.state is NodeState.INACTIVE
    assert await node.read(0, 512) == bytes(512)
    with pytest.raises(BlockDriverError, match=r"^Block node is inactive$") as exc:
        await node.write(0, b"x" * 512)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
        await node.write_zeroes(0, 512)
    with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
        await node.discard(0, 512)
    with pytest.raises(GenericError,
                       match=r"^Permission .resize. unavailable on inactive node$"):
        await layer.resize(node, 8 * MiB)
    # An inactive node takes no write permission on its file (no write lock).
    assert not file.cumulative_perms()[0] & Perm.WRITE


async def test_a_resize_waits_for_a_reload_under_way(tmp_path: Path, layer: BlockLayer) -> None:
    """An activation marks a node active before its driver, and those below,
    have reloaded what they cache (requests are held meanwhile): block_resize
    waits for the reload instead of changing the tables it reads, and is
    refused if the activation fails."""
    path = qcow2_file(tmp_path)
    node = await layer.add(qcow2_options(path))
    file = node.file
    assert file is not None
    file.hold_requests()  # the file node below is mid-reload
    try:
        task = asyncio.ensure_future(layer.resize(node, 8 * MiB))
        await asyncio.sleep(0.1)
        assert not task.done() and node.size() == 4 * MiB
    finally:
        file.release_requests()
    await asyncio.wait_for(task, 10)
    assert node.size() == 8 * MiB
    node.hold_requests()  # an activation of the node itself, that fails
    try:
        task = asyncio.ensure_future(layer.resize(node, 16 * MiB))
        await asyncio.sleep(0.1)
        assert not task.done()
        node.set_state(NodeState.INACTIVE)
    finally:
        node.release_requests()
    with pytest.raises(GenericError, match=r"^Permission .resize. unavailable on inactive node$"):
        await asyncio.wait_for(task, 10)
    assert node.size() == 8 * MiB


async def test_activation_then_inactivation(tmp_path: Path, layer: BlockLayer) -> None:
    node = await layer.add(qcow2_options(qcow2_file(tmp_path)), inactive=True)
    file = node.file
    assert file is not None
    await layer.set_active("fmt", True)
    assert node.state is NodeState.ACTIVE and file.state is NodeState.ACTIVE
    assert node.stats.invalidations == 1
    assert file.cumulative_perms()[0] & Perm.WRITE
    await node.write(0, b"a" * 512)

    # The file child cannot go first: its parent is still active.
    with pytest.raises(GenericError, match=r"^Node has active parent node$"):
        await layer.set_active("fmt-file", False)
    await layer.set_active("fmt", False)
    assert node.state is NodeState.INACTIVE and file.state is NodeState.INACTIVE
    assert not file.cumulative_perms()[0] & Perm.WRITE
    with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
        await node.write(0, b"b" * 512)
    # What was written before inactivation is on disk and still readable.
    assert await node.read(0, 512) == b"a" * 512

    await layer.set_active(None, True)
    assert node.state is NodeState.ACTIVE and node.stats.invalidations == 2
    assert await node.read(0, 512) == b"a" * 512


async def test_writes_refused_while_writing_back(tmp_path: Path, layer: BlockLayer) -> None:
    node = await layer.add(qcow2_options(qcow2_file(tmp_path)))
    await node.write(0, b"a" * 65536)
    task = asyncio.create_task(layer.set_active("fmt", False))
    while node.state is NodeState.ACTIVE:
        await asyncio.sleep(0)
    # The driver is writing back: no new writes, but its cache still serves reads.
    assert node.state is NodeState.INACTIVATING
    with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
        await node.write(65536, b"b" * 512)
    assert await node.read(0, 512) == b"a" * 512
    await task
    assert node.state is NodeState.INACTIVE
    assert await node.read(65536, 512) == bytes(512)


async def test_failed_activation_leaves_the_node_inactive(
    tmp_path: Path, layer: BlockLayer
) -> None:
    path = qcow2_file(tmp_path)
    node = await layer.add(qcow2_options(path), inactive=True)
    with open(path, "r+b") as f:  # the new owner broke the header meanwhile
        f.write(b"XXXX")
    with pytest.raises(GenericError) as exc:
        await layer.set_active("fmt", True)
    assert exc.value.desc.startswith("Could not reopen qcow2 layer: ")
    assert node.state is NodeState.INACTIVE
    assert node.activation_error == exc.value.desc
    with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
        await node.write(0, b"x" * 512)


async def test_active_parent_cannot_take_an_inactive_child(
    tmp_path: Path, layer: BlockLayer
) -> None:
    await layer.add({"driver": "file", "node-name": "base",
                     "filename": raw_file(tmp_path)}, inactive=True)
    with pytest.raises(GenericError) as exc:
        await layer.add({"driver": "raw", "node-name": "top", "file": "base"})
    assert exc.value.desc == "Inactive 'base' can't be a file child of active 'top'"
    assert layer.graph.lookup("top") is None


async def test_writable_user_blocks_inactivation_unless_allowed(
    tmp_path: Path, layer: BlockLayer
) -> None:
    node = await layer.add(qcow2_options(qcow2_file(tmp_path)))
    strict = edge_for(node, NodeUser("export", "e1", writable=True))
    await layer.graph.add_user(strict)
    with pytest.raises(GenericError) as exc:
        await layer.set_active("fmt", False)
    assert exc.value.desc == "Failed to inactivate node: Operation not permitted"
    with pytest.raises(GenericError) as exc:
        await layer.set_active(None, False)
    assert exc.value.desc == "Failed to inactivate all nodes: Operation not permitted"
    assert node.active
    await layer.graph.remove_user(strict)

    relaxed = edge_for(node, NodeUser("export", "e2", writable=True, allow_inactive=True))
    await layer.graph.add_user(relaxed)
    assert node.cumulative_perms()[0] & Perm.WRITE
    await layer.set_active("fmt", False)
    assert node.state is NodeState.INACTIVE
    # The user's write permission follows the node's state.
    assert not node.cumulative_perms()[0] & Perm.WRITE
    await layer.graph.remove_user(relaxed)


# --- errors and the driver registry ----------------------------------------------------


async def test_driver_errors_are_block_errors_with_qemu_texts(
    tmp_path: Path, layer: BlockLayer
) -> None:
    missing = str(tmp_path / "missing.raw")
    with pytest.raises(BlockDriverError) as exc:
        await layer.add({"driver": "file", "node-name": "disk", "filename": missing})
    assert exc.value.to_qmp() == {
        "class": "GenericError",
        "desc": f"Could not open '{missing}': No such file or directory",
    }
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(BlockDriverError) as exc:
        await layer.add({"driver": "raw", "node-name": "r", "size": 1000,
                         "file": {"driver": "file", "filename": raw_file(tmp_path)}})
    assert exc.value.desc == "Specified size is not multiple of 512"
    assert exc.value.errno == errno.EINVAL
    assert layer.graph.nodes == {}


async def test_registry_names_every_driver(layer: BlockLayer) -> None:
    assert sorted(DRIVERS) == ["file", "host_device", "nbd", "nfs", "null-co", "qcow2", "raw",
                               "rbd", "throttle"]
    assert all(cls.format_name == name for name, cls in DRIVERS.items())
    with pytest.raises(GenericError, match=r"^Unknown driver 'vmdk'$"):
        await layer.add({"driver": "vmdk", "node-name": "x"})


def test_probe_asks_the_drivers(tmp_path: Path) -> None:
    assert probe_format(qcow2_file(tmp_path)) == "qcow2"
    assert probe_format(raw_file(tmp_path)) == "raw"
    short = tmp_path / "short"
    short.write_bytes(b"QFI")
    assert probe_format(str(short)) == "raw"
    assert probe_format(str(tmp_path / "missing")) == "raw"
