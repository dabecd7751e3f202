"""A throw-away one-node Ceph cluster for the rbd tests.

One monitor and one bluestore OSD on a sparse file, bound to 127.0.0.1, every
path (data, sockets, pid and log files) under one directory.  Both daemons
run in the foreground as children of the test process, which stops them at
the end of the session.  The clients' configuration (``client.conf``) makes a
missing cache invalidation show: librbd's cache in writeback mode, no
writethrough until the first flush, and dirty data kept for a long time.

Without the Ceph packages the tests skip; with ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.tools import IN_CI, stop_process

if TYPE_CHECKING:
    from qmpd.block.graph import BlockGraph, BlockNode
    from qmpd.block.rbd import RbdDriver

#: The programs the cluster needs (ceph-mon, ceph-osd, ceph-common).
CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")
POOL = "rbd"


def require_ceph() -> None:
    """Skip without Ceph's daemons and tools or its Python bindings; fail in CI."""
    from qmpd.block.ceph import available

    missing = [tool for tool in CEPH_TOOLS if shutil.which(tool) is None]
    if not available():
        missing.append("python3-rados/python3-rbd")
    if missing:
        reason = f"Ceph is not installed (missing {', '.join(missing)})"
        if IN_CI:
            pytest.fail(f"{reason}: required in CI")
        pytest.skip(reason)


@contextmanager
def start_ceph() -> Iterator[CephCluster]:
    """A cluster in a fresh short directory (socket paths must stay short),
    stopped and removed afterwards."""
    require_ceph()
    root = Path(tempfile.mkdtemp(prefix="qceph", dir="/tmp"))
    cluster = CephCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    """A running cluster: ``conf`` for admin tools, ``client_conf`` for the
    clients under test (qmpd, QEMU)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        self.conf = root / "ceph.conf"
        self.client_conf = root / "client.conf"
        self.keyring = root / "admin.keyring"
        self.mon: subprocess.Popen[bytes] | None = None
        self.osd: subprocess.Popen[bytes] | None = None
        self._images = 0

    # --- configuration --------------------------------------------------------

    def _global(self) -> str:
        r = self.root
        return f"""[global]
fsid = {self.fsid}
mon_host = v2:127.0.0.1:{self.port}
mon_initial_members = a
public_addr = 127.0.0.1
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {self.keyring}
run_dir = {r}/run
pid_file = {r}/run/$name.pid
log_file = {r}/log/$name.log
admin_socket = {r}/run/$name.asok
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
osd_crush_chooseleaf_type = 0
ms_bind_ipv4 = true
ms_bind_ipv6 = false
mon_warn_on_pool_no_redundancy = false
debug_ms = 0

[mon]
mon_data = {r}/mon
mon_osd_down_out_interval = 0

[osd]
osd_data = {r}/osd
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {10 << 30}
bluestore_cache_size = {64 << 20}
osd_memory_target = {512 << 20}
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
"""

    def _client(self) -> str:
        # Clients fail fast on a dead cluster instead of waiting forever.
        return f"""[global]
fsid = {self.fsid}
mon_host = v2:127.0.0.1:{self.port}
keyring = {self.keyring}
log_file = {self.root}/log/client.$pid.log

[client]
admin_socket =
client_mount_timeout = 5
rados_mon_op_timeout = 5
rados_osd_op_timeout = 8
rbd_cache = true
rbd_cache_policy = writeback
rbd_cache_writethrough_until_flush = false
rbd_cache_max_dirty_age = 600
"""

    # --- lifecycle ------------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = 60) -> str:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"{' '.join(argv)}: {res.returncode}\n{res.stdout}{res.stderr}"
        return res.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", str(self.conf), *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60) -> str:
        return self._run("rbd", "-c", str(self.conf), *args, timeout=timeout)

    def start(self) -> None:
        r = self.root
        for sub in ("run", "log", "mon", "osd"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._global())
        self.client_conf.write_text(self._client())
        mon_keyring = r / "mon.keyring"
        self._run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key",
                  "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", "--create-keyring", str(self.keyring), "--gen-key",
                  "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow *")
        self._run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.keyring))
        monmap = r / "monmap"
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{self.port}]", str(monmap))
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a",
                  "--monmap", str(monmap), "--keyring", str(mon_keyring))
        self.start_mon()
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        assert osd_id == "0", osd_id
        self.ceph("auth", "get-or-create", "osd.0", "mon", "allow profile osd", "osd", "allow *",
                  "mgr", "allow profile osd", "-o", str(r / "osd" / "keyring"))
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                  "--keyring", str(r / "osd" / "keyring"), timeout=120)
        self.start_osd()
        self.ceph("osd", "pool", "create", POOL, "8", "8")
        self.rbd("pool", "init", POOL, timeout=120)

    def _spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.root / "log" / f"{argv[0]}.stderr", "ab")
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()

    def start_mon(self) -> None:
        self.mon = self._spawn("ceph-mon", "-f", "-c", str(self.conf), "-i", "a")
        self._wait(lambda: self.ceph("mon", "stat", timeout=10) != "", "monitor")

    def start_osd(self) -> None:
        def up() -> bool:
            if self.osd is None or self.osd.poll() is not None:
                # It exited on its way up (a restart right after a stop, on a
                # loaded machine): what it said goes to the test's output.
                if self.osd is not None:
                    sys.stderr.write(f"ceph-osd exited with {self.osd.returncode}:\n"
                                     f"{self._log_tail('osd.0.log')}\n")
                self.osd = self._spawn("ceph-osd", "-f", "-c", str(self.conf), "-i", "0",
                                       "--keyring", str(self.root / "osd" / "keyring"))
            return '"num_up_osds":1' in self.ceph("osd", "stat", "-f", "json",
                                                  timeout=10).replace(" ", "")

        self.osd = None
        self._wait(up, "OSD up", log="osd.0.log")

    def _log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.root / "log" / name).read_text(errors="replace")
        except OSError as exc:
            return f"({exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _wait(self, ready: object, what: str, timeout: float = 90, log: str = "") -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except (AssertionError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                # The cluster's directory goes with the session: its log's end
                # goes with the error.
                tail = f"\n{log}:\n{self._log_tail(log)}" if log else ""
                raise RuntimeError(
                    f"Ceph test cluster: {what} not ready; logs in {self.root}/log{tail}")
            time.sleep(0.2)

    def stop_osd(self) -> None:
        stop_process(self.osd)
        self.osd = None

    def stop_mon(self) -> None:
        stop_process(self.mon)
        self.mon = None

    def ensure_running(self) -> None:
        """Restart whatever a fault test stopped."""
        if self.mon is None or self.mon.poll() is not None:
            self.start_mon()
        if self.osd is None or self.osd.poll() is not None:
            self.start_osd()

    def stop(self) -> None:
        self.stop_osd()
        self.stop_mon()

    # --- images ---------------------------------------------------------------------

    def new_image(self, size: str = "64M", exclusive_lock: bool = True,
                  prefix: str = "img", features: str | None = None) -> str:
        """A new image's name in the pool; without ``exclusive_lock`` it has
        only the layering feature (``features`` names them all instead)."""
        self._images += 1
        name = f"{prefix}{self._images}-{os.getpid()}"
        if features is None:
            features = "layering,exclusive-lock" if exclusive_lock else "layering"
        self.rbd("create", "--size", size, "--image-feature", features, f"{POOL}/{name}")
        return name

    def import_image(self, path: Path, exclusive_lock: bool = True, prefix: str = "imp") -> str:
        """A new image holding the bytes of the file at ``path`` (a qcow2, say)."""
        self._images += 1
        name = f"{prefix}{self._images}-{os.getpid()}"
        features = "layering,exclusive-lock" if exclusive_lock else "layering"
        self.rbd("import", "--no-progress", "--image-feature", features, str(path),
                 f"{POOL}/{name}")
        return name

    def remove_image(self, name: str) -> None:
        subprocess.run(["rbd", "-c", str(self.conf), "rm", "--no-progress", f"{POOL}/{name}"],
                       capture_output=True, timeout=60)

    def spec(self, image: str) -> str:
        """The image as QEMU's tools name it (``rbd:pool/image:conf=...``)."""
        return f"rbd:{POOL}/{image}:conf={self.client_conf}"

    def blockdev(self, image: str, **extra: object) -> dict[str, object]:
        """``-blockdev``/``blockdev-add`` options of an rbd node on ``image``."""
        return {"driver": "rbd", "pool": POOL, "image": image,
                "conf": str(self.client_conf), **extra}


def lock_holders(cluster: CephCluster, image: str) -> list[str]:
    """Who holds ``image``'s locks (the exclusive lock shows as ``auto ...``):
    their client names, from ``rbd lock ls``."""
    import json

    out = cluster.rbd("lock", "ls", "--format", "json", f"{POOL}/{image}")
    return [entry["locker"] for entry in json.loads(out or "[]")]


async def open_rbd_node(options: dict[str, Any], cache_direct: bool = False
                        ) -> tuple[BlockGraph, BlockNode, RbdDriver]:
    """A writable rbd node ``r`` opened with ``options`` (``blockdev``'s), in
    a graph of its own with two I/O threads (closed if the open fails)."""
    from qmpd.block.graph import BlockGraph, NodeConfig
    from qmpd.block.rbd import RbdDriver

    graph = BlockGraph(io_threads=2)
    try:
        config = NodeConfig(read_only=False, force_share=False, detect_zeroes="off",
                            discard_unmap=False, cache_direct=cache_direct, cache_no_flush=False,
                            auto_read_only=False)
        node = graph.new_node("r", False, config)
        driver = RbdDriver(node)
        node.driver = driver
        await driver.open(options)
        graph.register(node)
    except BaseException:
        graph.close()
        raise
    return graph, node, driver
