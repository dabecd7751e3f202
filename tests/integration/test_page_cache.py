"""Activation and the host page cache: dropped where another host may have
written the image, kept where every writer goes through this host's cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qmpd.block.file import page_cache_is_shared
from tests.support.tools import qemu_img, qemu_io, run_tool

TMPFS = 0x01021994
DATA = 8 << 20
PAGE = 4096


def resident_pages(path: Path) -> int:
    out = run_tool("fincore", "--noheadings", "--output", "PAGES", str(path)).stdout
    return int(out.split()[0])


def filesystem_type(path: Path) -> int:
    return int(run_tool("stat", "-f", "--format=%t", str(path)).stdout.strip(), 16)


def test_the_local_filesystems_are_the_only_shared_ones() -> None:
    for fs in (0xEF53, 0x58465342, 0x9123683E, TMPFS):  # ext4, xfs, btrfs, tmpfs
        assert page_cache_is_shared(fs)
    # NFS, FUSE, CephFS, SMB, GFS2, OCFS2, overlayfs, unknown
    for fs in (0x6969, 0x65735546, 0x00C36400, 0xFE534D42, 0x01161970, 0x7461636F,
               0x794C7630, 0):
        assert not page_cache_is_shared(fs)


def test_activation_keeps_a_local_page_cache_unless_drop_cache_is_given(
        qmpd_factory: Any, tmp_path: Path) -> None:
    fs = filesystem_type(tmp_path)
    if fs == TMPFS:
        pytest.skip("tmpfs pages cannot be dropped: nothing to tell apart")
    images = {}
    for name in ("default", "dropped"):
        images[name] = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(images[name]), "64M")
        qemu_io("-c", f"write -P 0x11 0 {DATA}", str(images[name]), check=True)
    proc = qmpd_factory("--incoming", "defer")
    c = proc.client()
    c.negotiate()
    for name, path in images.items():
        file: dict[str, Any] = {"driver": "file", "filename": str(path)}
        if name == "dropped":
            file["drop-cache"] = True
        assert c.cmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                                      "file": file}) == {"return": {}}
    for path in images.values():
        path.read_bytes()  # every page of the image in this host's cache
        assert resident_pages(path) >= DATA // PAGE
    assert c.cmd("blockdev-set-active", {"active": True}) == {"return": {}}
    # Asked for explicitly, the drop happens on any filesystem: only the
    # metadata read again is back in the cache.
    assert resident_pages(images["dropped"]) < DATA // PAGE // 4
    if page_cache_is_shared(fs):
        assert resident_pages(images["default"]) >= DATA // PAGE
    else:  # a filesystem another host may write: dropped by default too
        assert resident_pages(images["default"]) < DATA // PAGE // 4
    # Either way the image reads what was written.
    for name in images:
        reply = c.cmd("human-monitor-command",
                      {"command-line": f'qemu-io {name} "read -P 0x11 0 {DATA}"'})
        assert reply == {"return": ""}
