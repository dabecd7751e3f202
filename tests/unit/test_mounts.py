"""The mount-table watch that lets the file driver open on the event loop."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qmpd.block.mounts import LOCAL_TYPES, MountWatch, mount_types

LOCAL_LINE = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
NFS_LINE = "40 22 0:50 / /mnt/nfs rw,relatime shared:9 - nfs4 srv:/export rw,vers=4.2\n"
FUSE_LINE = "41 22 0:51 / /mnt/f rw - fuse.sshfs host: rw,user_id=0\n"


def test_mount_types_reads_the_field_after_the_separator() -> None:
    # Optional fields (shared:N) come before " - "; the type comes after it.
    assert mount_types(LOCAL_LINE + NFS_LINE + FUSE_LINE) == {"ext4", "nfs4", "fuse.sshfs"}
    assert mount_types("") == set()


@pytest.mark.parametrize("extra, local", [("", True), (NFS_LINE, False), (FUSE_LINE, False)])
def test_any_remote_mount_makes_the_table_not_local(tmp_path: Path, extra: str,
                                                     local: bool) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(LOCAL_LINE + extra)
    assert MountWatch(str(table)).all_local() is local


def test_no_table_is_not_local(tmp_path: Path) -> None:
    assert MountWatch(str(tmp_path / "missing")).all_local() is False
    assert "nfs" not in LOCAL_TYPES and "fuse" not in LOCAL_TYPES and "autofs" not in LOCAL_TYPES


def test_a_new_mount_is_seen_without_polling_the_file_again(tmp_path: Path) -> None:
    """The kernel's change signal on /proc/self/mountinfo re-reads the table:
    a mount of a type the watch does not count as local flips the answer."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    watch = MountWatch(local_types=LOCAL_TYPES - {"ramfs"})
    real = MountWatch()
    if not real.all_local() or not watch.all_local():
        pytest.skip("this machine already mounts a non-local file system")
    where = tmp_path / "mnt"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "ramfs", "none", str(where)], capture_output=True)
    if res.returncode != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"mount failed under CI: {res.stderr!r}")
        pytest.skip(f"cannot mount here: {res.stderr!r}")
    try:
        assert watch.all_local() is False
        assert real.all_local() is True
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert watch.all_local() is True
    watch.close()
    real.close()
